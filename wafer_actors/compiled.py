"""Compiled loops: ``numba.njit`` with its on-disk cache, each compiled once per machine, not once per process.

The cache is found by the loop's module name and its source's contents, not by the path of
its file (numba's default): a Ray job's working directory is a fresh copy of the package,
and its tiles load what any earlier run of the same code on the machine saved instead of
compiling again. It lives in ``$NUMBA_CACHE_DIR`` if set, else in the user's cache directory;
another version of a module saves under other names beside it.

Every tile actor of a wafer calls the same loops with the same argument types. On a cold
cache (the first run of this code on the machine) each actor would compile all of them at
the same time: seven actors on two cores took seven times a compile's CPU. Here a process
compiles a loop only while it holds that loop's lock file next to numba's cache, so the
first one compiles and saves, and the others, once they hold the lock, find what it saved
and load it; different loops compile at the same time. Compiling talks to no other process,
so whoever holds a lock always finishes; the operating system releases a lock whose process
died. A loop already in the cache loads without the lock: twenty tiles starting together
would otherwise load it one at a time.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from numba import config, njit
from numba.core.caching import CompileResultCacheImpl, FunctionCache, _CacheLocator, _SourceFileBackedLocatorMixin
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


@functools.cache
def _source_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


class _ByModule(_SourceFileBackedLocatorMixin, _CacheLocator):
    """A loop's cache directory named for its module (``wafer_actors.kernels``), its files for the loop, its line and
    its source's hash, wherever the package's files are."""

    def __init__(self, py_func: Callable, py_file: str):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        root = config.CACHE_DIR or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                                "wafer-llm")
        self._cache_path = os.path.join(root, py_func.__module__)

    def get_cache_path(self) -> str:
        return self._cache_path

    def get_disambiguator(self) -> str:  # two versions of a module never share an index (nor read each other's data)
        return f"{self._lineno}-{_source_hash(self._py_file)}"


class _Impl(CompileResultCacheImpl):
    _locator_classes = [_ByModule, *CompileResultCacheImpl._locator_classes]  # numba's where ours cannot write


class _Cache(FunctionCache):
    _impl_class = _Impl


def _saved(dispatcher: Dispatcher, sig: tuple) -> bool:
    """Whether numba's cache holds whole machine code of ``dispatcher`` for argument types ``sig`` (numba writes
    the index before the data, each file whole: the data file's presence says it is complete)."""
    cache = dispatcher._cache
    name = cache._cache_file._load_index().get(cache._index_key(sig, dispatcher.targetctx.codegen()))
    return name is not None and os.path.exists(os.path.join(cache._cache_path, name))


def compiled(fn: Callable | None = None, **options) -> Callable:
    """``numba.njit(cache=True, **options)``, its cache found by module and source (``_ByModule``), its compiles one
    process at a time."""
    if fn is None:
        return lambda f: compiled(f, **options)
    dispatcher = njit(**options)(fn)
    dispatcher._cache = _Cache(fn)  # what ``cache=True`` sets up, with our locator
    directory, compile_sig = dispatcher._cache._cache_path, dispatcher.compile
    name = f"{fn.__module__}.{fn.__qualname__}"

    def compile_once(sig: tuple):  # numba calls this for argument types it has no machine code for in this process
        if _saved(dispatcher, sig):
            return compile_sig(sig)  # a load from the cache
        with _one_process_at_a_time(directory, name):
            return compile_sig(sig)

    dispatcher.compile = compile_once
    return dispatcher
