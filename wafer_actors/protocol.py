"""How a protocol is declared: a per-tile body plus the routes it needs.

A protocol body is an ``async`` function ``body(tile, **kwargs)`` that every tile runs
(SPMD): it describes what each core computes, sends and receives, vectorised over the
tile's cores. ``routes(mesh, **kwargs)`` returns the routes (colours) the body will use,
so the wafer can check routing entries per core before any work starts.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from .transfer import Route


@dataclass(frozen=True)
class Protocol:
    """A named protocol: ``body`` runs on every tile, ``routes`` is checked on the driver."""

    body: Callable[..., Awaitable[Any]]
    routes: Callable[..., list[Route]]

    @property
    def path(self) -> str:
        """Import path (``module:name``) by which tiles in other processes find this protocol."""
        return f"{self.body.__module__}:{self.body.__qualname__}"

    @property
    def name(self) -> str:
        return self.body.__qualname__


def protocol(routes: Callable[..., list[Route]]) -> Callable[[Callable[..., Awaitable[Any]]], Protocol]:
    """Decorate a tile body as a protocol that uses the routes ``routes(mesh, **kwargs)`` returns."""

    def wrap(body: Callable[..., Awaitable[Any]]) -> Protocol:
        return Protocol(body, routes)

    return wrap


def resolve(path: str) -> Protocol:
    """Find a protocol by its import path."""
    module, _, name = path.partition(":")
    obj = getattr(importlib.import_module(module), name)
    if not isinstance(obj, Protocol):
        raise TypeError(f"{path} is a {type(obj).__name__}, not a Protocol")
    return obj
