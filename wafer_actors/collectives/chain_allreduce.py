"""Chain allreduce along a mesh axis: stream to a root, then multicast back.

The pipeline allreduce of WaferLLM §6.1 (a single-phase chain, as in its prefill kernels).
Per line of the other axis, with ``n`` cores along ``axis`` and root index ``r``:

1. Reduce (``max(r, n - 1 - r)`` steps). Step s: core ``s`` sends its running block
   toward the root (``+1``) if ``s < r``, and core ``n - 1 - s`` sends it the other way
   (``-1``) if ``n - 1 - s > r``. Each receiver combines the stream with its own block as it
   arrives and forwards it in the next step: one software relay (``beta``) per core, one
   hop (``alpha``) per step, and the block's transfer time paid once. The root combines
   the stream from the low side, then the one from the high side.
2. Broadcast (one step, optional): the root multicasts the result along the axis in both
   directions; routers on the way deliver and forward at once (``alpha`` per hop, no relay).

Layout: any; every core holds one block of the buffer, combined elementwise.
Messages per step: at most one flow per core; at most one message per pair of tiles.
Routes: reduce and broadcast, each direction: 4 routing entries at most per core.
Critical path: ``max(r, n-1-r)`` relay stages and ``n - 1`` hops on the far side (see
``tests/wafer_actors/test_chain_allreduce.py`` for the closed form checked).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..mesh import Mesh
from ..protocol import protocol
from ..transfer import Route, Transfer
from .shift import _along

OPS = ("add", "max")


def default_root(n: int) -> int:
    """The middle core, as WaferLLM's chain reductions use."""
    return n // 2


@lru_cache(maxsize=64)
def chain_plan(mesh: Mesh, axis: str, root: int, broadcast: bool) -> tuple[list[tuple[Transfer | None, Transfer | None]], tuple[Transfer, ...]]:
    """Plan the reduce steps (up-going, down-going transfer per step) and the broadcast.

    Raises:
        ValueError: ``root`` is not a core index along ``axis``.
    """
    n = mesh.axis_size(axis)
    if not isinstance(root, (int, np.integer)) or not 0 <= root < n:
        raise ValueError(f"root must be a core index along {axis!r} in [0, {n - 1}], got {root!r}")
    up, down = f"reduce_{axis}+", f"reduce_{axis}-"
    steps = []
    for s in range(max(root, n - 1 - root)):
        a = _along(mesh, axis, f"{up}:{root}:{s}", up, np.array([s]), np.array([s + 1])) if s < root else None
        hi = n - 1 - s
        b = _along(mesh, axis, f"{down}:{root}:{s}", down, np.array([hi]), np.array([hi - 1])) if hi > root else None
        steps.append((a, b))
    casts = []
    if broadcast:
        for route, dst in ((f"bcast_{axis}-", np.arange(root)), (f"bcast_{axis}+", np.arange(root + 1, n))):
            if len(dst):
                casts.append(_along(mesh, axis, f"{route}:{root}", route, np.full(len(dst), root), dst))
    return steps, tuple(casts)


def _routes(mesh: Mesh, *, buffer: str, axis: str, op: str = "add", root: int | None = None, broadcast: bool = True) -> list[Route]:
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    root = default_root(mesh.axis_size(axis)) if root is None else root
    steps, casts = chain_plan(mesh, axis, root, broadcast)
    by_route: dict[str, list[Transfer]] = {}
    for t in [t for pair in steps for t in pair if t is not None] + list(casts):
        by_route.setdefault(t.route, []).append(t)
    return [Route(name, tuple(ts)) for name, ts in by_route.items()]


@protocol(routes=_routes)
async def chain_allreduce(tile, *, buffer: str, axis: str, op: str = "add", root: int | None = None, broadcast: bool = True) -> None:
    """Reduce ``buffer`` with ``op`` along ``axis`` to ``root`` (default: the middle), then broadcast."""
    mesh = tile.tiling.mesh
    root = default_root(mesh.axis_size(axis)) if root is None else root
    steps, casts = chain_plan(mesh, axis, root, broadcast)
    for s, pair in enumerate(steps):
        live = [t for t in pair if t is not None]
        for t in live:  # send toward the root; relays forward the stream they are combining
            tile.send(t, buffer, stream=s > 0)
        for t in live:  # receive from the far side, combine while streaming
            await tile.recv(t, buffer, op=op, stream=True)
    for t in casts:  # root multicasts the result both ways
        tile.send(t, buffer)
    for t in casts:
        await tile.recv(t, buffer)
