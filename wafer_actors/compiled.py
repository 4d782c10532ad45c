"""Compiled loops: ``numba.njit`` with its on-disk cache, each compiled once per machine, not once per process.

Every tile actor of a wafer calls the same loops with the same argument types. On a cold
cache (a first run, or a Ray job whose working directory is a fresh copy of the package)
each actor would compile all of them at the same time: seven actors on two cores took
seven times a compile's CPU. Here a process compiles a loop only while it holds that loop's
lock file next to numba's cache, so the first one compiles and saves, and the others, once
they hold the lock, find what it saved and load it; different loops compile at the same
time. Compiling talks to no other process, so whoever holds a lock always finishes; the
operating system releases a lock whose process died. A loop already in the cache loads
without the lock: twenty tiles starting together would otherwise load it one at a time.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from numba import njit
from numba.core.dispatcher import Dispatcher

_in_process = threading.RLock()
_depth = 0  # compiles under way in this process (one may start another): only the outermost takes the file


@contextmanager
def _one_process_at_a_time(directory: str, name: str) -> Iterator[None]:
    global _depth
    with _in_process:
        lock = None
        if _depth == 0:
            try:
                os.makedirs(directory, exist_ok=True)
                lock = open(os.path.join(directory, name + ".lock"), "a")
            except OSError:  # no writable cache directory: numba compiles without saving, nothing to share
                pass
            else:
                fcntl.flock(lock, fcntl.LOCK_EX)
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
            if lock is not None:
                lock.close()  # releases the lock


def _saved(dispatcher: Dispatcher, sig: tuple) -> bool:
    """Whether numba's cache holds whole machine code of ``dispatcher`` for argument types ``sig`` (numba writes
    the index before the data, each file whole: the data file's presence says it is complete)."""
    cache = dispatcher._cache
    name = cache._cache_file._load_index().get(cache._index_key(sig, dispatcher.targetctx.codegen()))
    return name is not None and os.path.exists(os.path.join(cache._cache_path, name))


def compiled(fn: Callable | None = None, **options) -> Callable:
    """``numba.njit(cache=True, **options)``, its compiles one process at a time."""
    if fn is None:
        return lambda f: compiled(f, **options)
    dispatcher = njit(cache=True, **options)(fn)
    directory, compile_sig = dispatcher._cache._cache_path, dispatcher.compile
    name = f"{fn.__module__}.{fn.__qualname__}"

    def compile_once(sig: tuple):  # numba calls this for argument types it has no machine code for in this process
        if _saved(dispatcher, sig):
            return compile_sig(sig)  # a load from the cache
        with _one_process_at_a_time(directory, name):
            return compile_sig(sig)

    dispatcher.compile = compile_once
    return dispatcher
