"""Decode's compiled loops, readied in the background while a run on Ray tiles loads and prefills.

On a cold cache a tile compiles every loop as it first meets it: a mesh prefill's, then at
the first decode step decode's, one after the other on one core. While the tiles prefill,
the driver only waits, so it compiles decode's loops meanwhile by decoding two tokens of a
tiny random model on an in-process wafer; they reach the tiles through numba's cache
(``wafer_actors.compiled``: a loop another process is compiling is waited for, then loaded).
On a warm cache the thread only loads them (half a second), on a core the run leaves idle. With
Ray tiles the driver calls no compiled loop itself, so the thread is its only user of numba's
threads (whatever threading layer numba picked).
"""

from __future__ import annotations

import threading

from .checkpoint import random_weights
from .config import LlamaConfig
from .engine import WaferLlama
from .generate import generate

TINY = LlamaConfig("warm-up", 1, 48, 80, 6, 2, 8, 100)


def warm_decode(kv: str, algo: str, executor: str) -> threading.Thread:
    """Start compiling decode's loops (as a decode step with these options calls them) on a daemon thread."""

    def run() -> None:
        with WaferLlama(TINY, random_weights(TINY), mesh=(4, 6), transport="local", kv=kv, algo=algo,
                        executor=executor, tokens=4) as m:
            generate(m, [1, 2], max_new_tokens=2)

    thread = threading.Thread(target=run, name="warm-decode", daemon=True)
    thread.start()
    return thread
