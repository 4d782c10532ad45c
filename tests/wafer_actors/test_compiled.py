"""Kernels compile once per machine: processes that start on a cold cache together compile each loop once, and a
copy of the package elsewhere (a Ray job's working directory) loads what the original saved."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import wafer_actors

CALL = """
import numpy as np
from wafer_actors import kernels
x = np.ones((2, 3, 4), np.float32)
out = np.zeros((2, 3, 5), np.float32)
kernels.block_vecmat(x, np.ones((2, 3, 4, 5), np.float32), out)
assert (out == 4).all()
print(sum(kernels._vecmat.stats.cache_misses.values()))  # signatures compiled here, not loaded
"""


def test_processes_on_a_cold_cache_compile_a_loop_once_and_the_others_load_it(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", CALL], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    misses = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0
        misses.append(int(out.split()[-1]))
    assert sorted(misses) == [0, 0, 1]  # one compiled and saved; the two others waited and loaded what it saved


HOLD = """
import fcntl, os, sys, time
from wafer_actors import kernels
d = kernels._vecmat._cache._cache_path
lock = open(os.path.join(d, "wafer_actors.kernels._vecmat.lock"), "a")
fcntl.flock(lock, fcntl.LOCK_EX)  # as a process compiling the loop holds it
print("held", flush=True)
time.sleep(600)
"""


def test_a_loop_in_the_cache_loads_while_another_process_holds_its_compile_lock(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", CALL], env=env, check=True, timeout=300)  # compiles and saves it
    holder = subprocess.Popen([sys.executable, "-c", HOLD], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        out = subprocess.run([sys.executable, "-c", CALL], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.split()[-1] == "0"  # loaded, not compiled, without waiting
    finally:
        holder.kill()
        holder.wait()


def test_a_copy_of_the_package_in_another_directory_loads_what_the_original_saved(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    copy = tmp_path / "job"
    shutil.copytree(Path(wafer_actors.__file__).parent, copy / "wafer_actors", ignore=shutil.ignore_patterns("__pycache__"))
    first = subprocess.run([sys.executable, "-c", CALL], env=env, capture_output=True, text=True, timeout=300, check=True)
    again = subprocess.run([sys.executable, "-c", "import wafer_actors; assert wafer_actors.__file__.startswith(%r)\n%s"
                            % (str(copy), CALL)], env={**env, "PYTHONPATH": str(copy)}, cwd=copy, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (first.stdout.split()[-1], again.stdout.split()[-1]) == ("1", "0")  # compiled once, then loaded by the copy
    (copy / "wafer_actors" / "kernels.py").write_text((copy / "wafer_actors" / "kernels.py").read_text() + "\n# edited\n")
    edited = subprocess.run([sys.executable, "-c", CALL], env={**env, "PYTHONPATH": str(copy)}, cwd=copy,
                            capture_output=True, text=True, timeout=300, check=True)
    assert edited.stdout.split()[-1] == "1"  # other source: compiled anew, not read from the original's cache
