"""Neighbour shift of a buffer along a mesh axis.

Per core, in one step: send the block to the core ``disp`` places along ``axis``, and
receive (store) the block from the core ``disp`` places the other way (MPI's
``Sendrecv`` after ``Cart_shift``). Without wrap-around the cores at the open edge keep
their block. With wrap-around the ring closes over the whole axis: the flows that fall
off one end travel back across the row (or column) to the other end, ``n - |disp|`` hops
on a route of their own.

Layout: any; every core holds one block of the buffer.
Messages per step: one flow per core; at most one message per pair of tiles.
Cost: all clocks equal at the start, ``disp = ±1``: ``alpha + B/w`` without wrap and
``(n - 1) * alpha + B/w`` with it (B bytes per block, w link bytes per cycle). For
``|disp| > 1`` each link carries ``|disp|`` flows, which share its bandwidth.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..errors import InvalidArgument
from ..mesh import NO_CORE, Mesh
from ..protocol import protocol
from ..transfer import Route, Transfer


@lru_cache(maxsize=256)
def shift_transfers(mesh: Mesh, axis: str, disp: int, wrap: bool) -> tuple[Transfer, ...]:
    """Plan the shift: the neighbour transfer, plus the wrap-around transfer if asked for.

    Raises:
        ValueError: ``disp`` is zero or not shorter than the axis.
    """
    n = mesh.axis_size(axis)
    if not isinstance(disp, (int, np.integer)) or disp == 0 or abs(disp) >= n:
        raise InvalidArgument(f"shift disp along {axis!r} must be a non-zero integer with |disp| < {n}, got {disp!r}")
    source, _ = mesh.shift(axis, disp, wrap=wrap)
    idx = np.arange(n)
    inside = (source != NO_CORE) & (idx - source == disp)  # receivers fed by a plain neighbour flow
    sign = "+" if disp > 0 else "-"
    plans = [(f"shift_{axis}{sign}", inside)]
    if wrap:
        plans.append((f"shift_{axis}{sign}_wrap", ~inside))
    transfers = []
    for route, along in plans:
        dst = idx[along]
        src = source[along]
        transfers.append(Transfer.along(mesh, axis, f"{route}:{disp}", route, src, dst))
    return tuple(transfers)


def _routes(mesh: Mesh, *, buffer: str, axis: str, disp: int = 1, wrap: bool = False) -> list[Route]:
    return [Route(t.route, (t,)) for t in shift_transfers(mesh, axis, disp, wrap)]


@protocol(routes=_routes)
async def shift(tile, *, buffer: str, axis: str, disp: int = 1, wrap: bool = False) -> None:
    """Shift ``buffer`` by ``disp`` cores along ``axis`` (wrapping round if ``wrap``)."""
    transfers = shift_transfers(tile.tiling.mesh, axis, disp, wrap)
    for t in transfers:  # send along the axis (and back across it for the wrap)
        tile.send(t, buffer)
    for t in transfers:  # receive from the other side
        await tile.recv(t, buffer)
