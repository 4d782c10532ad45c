"""Kernels compile once per machine: processes that start on a cold cache together compile each loop once."""

from __future__ import annotations

import os
import subprocess
import sys

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
