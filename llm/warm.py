"""The compiled loops of a run on Ray tiles, readied in other processes while the run loads.

On a cold cache a tile compiles every loop as it first meets it: the prefill's in its first
layer and its LM head, decode's at the first decode step, one after the other on one core,
while the driver only waits. So ``generate`` starts, before it even loads the model,
processes that prefill and decode a tiny random model with the run's options on an
in-process wafer; the loops reach the tiles through numba's cache (``wafer_actors.compiled``:
a loop another process is compiling is waited for, then loaded). Processes, not a thread:
compiling holds the interpreter lock, and a thread tripled the model's load time. On a warm
cache they only load the loops (about a second and a half each).
"""

from __future__ import annotations

import argparse
import atexit
import subprocess
import sys

from .config import LlamaConfig

# The LM head's vocabulary is over twice the FFN's width per core, so its prefill runs in column chunks, as a real model's
TINY = LlamaConfig("warm-up", 1, 48, 80, 6, 2, 8, 400)
PROMPT = [1, 2, 3]


def warm_up(kv: str, algo: str, executor: str, prefill: str) -> list[subprocess.Popen]:
    """Start compiling the loops a run with these options meets; the processes are stopped when this one exits.

    Decode's loops compile in a second process beside the prefill's: a loop two processes want is
    compiled by one while the other waits, so processes that met the loops in the same order
    (as the tiles do) would only take turns.
    """
    parts = ["prefill", "decode"] if prefill == "mesh" else ["decode"]
    procs = [subprocess.Popen([sys.executable, "-m", "llm.warm", part, kv, algo, executor], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, start_new_session=True) for part in parts]
    atexit.register(_stop, procs)
    return procs


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:  # this run ended first (a failure, or it needed none of the loops left)
            proc.kill()  # numba writes each cache file whole (a temporary file, then a rename); the lock goes with it
            proc.wait()


def run(part: str, kv: str, algo: str, executor: str) -> None:
    """``prefill``: a mesh prefill of a 3-token prompt to a tiny random model, then one decode step;
    ``decode``: its first prompt token fed as a decode step, then one more."""
    from .checkpoint import random_weights
    from .engine import WaferLlama
    from .generate import generate

    mesh = part == "prefill"
    with WaferLlama(TINY, random_weights(TINY), mesh=(6, 6), transport="local", kv=kv, algo=algo, executor=executor,
                    tokens=len(PROMPT) + 1, prefill_tokens=len(PROMPT) if mesh else 0) as m:
        generate(m, PROMPT if mesh else PROMPT[:1], max_new_tokens=2, prefill="mesh" if mesh else "token")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["prefill", "decode"])
    for name in ("kv", "algo", "executor"):
        ap.add_argument(name)
    run(**vars(ap.parse_args()))
