"""GEMM-T: C = A . B^T without a transpose (WaferLLM §5.4, used for Q . K^T).

Layout: A (M, K), B (N, K) and C (M, N) are all ``Spec("y", "x")``, so core (py, px)
holds A[py, px] (Mt x Kt), B[py, px] (Nt x Kt) and C[py, px] (Mt x Nt); K is split over x
for both operands, and B is never transposed or re-laid out.

P steps, no alignment. In step s the core at y-ring place I (INTERLEAVE ring along y)
holds B's row block ``n = ring[(I + s) mod P]`` for its k block px. Per step:

1. send B to the y-ring predecessor (non-blocking, at most two hops);
2. ``part = A_blk . B_blk^T``: the k-block px share of C[py, n] (Mt Kt Nt FMACs);
3. reduce ``part`` along the row to column n (a streaming chain to a root that moves
   with s), where the root adds it into its C block;
4. receive the next B block.

Routes: the y-ring (3 entries) and the two chain directions along x (2 entries each).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..errors import ProtocolError
from ..mesh import Mesh
from ..protocol import protocol
from ..transfer import Route, Transfer
from .allreduce import Pair, chain_steps
from .interleave import places, ring_order
from .mesh_gemm import _ring_shift, check_square


@lru_cache(maxsize=8)
def gemm_t_plan(mesh: Mesh) -> tuple[object, list[np.ndarray]]:
    """The y-ring shift and, per step, the root column of every row."""
    p = check_square(mesh, "gemm_t")
    ring = ring_order(p)
    place = places(ring)
    roots = [ring[(place + s) % p] for s in range(p)]  # roots[s][py]: column holding C[py, n]
    return _ring_shift(mesh, "y", ring, +1, "gemm_t_ring_y"), roots


@lru_cache(maxsize=1024)
def _reduce_steps(mesh: Mesh, s: int) -> list[Pair]:
    _, roots = gemm_t_plan(mesh)
    p = mesh.width
    groups = tuple((np.arange(p), int(r)) for r in roots[s])
    return chain_steps(mesh, "x", "gemm_t_reduce_x", groups, lines=np.arange(mesh.height))


def _routes(mesh: Mesh, *, a: str, b: str, c: str) -> list[Route]:
    ring_y, _ = gemm_t_plan(mesh)
    hops = np.arange(mesh.width - 1)
    # over P steps every core is a chain end, a relay and a root: every neighbour hop, both ways
    east = Transfer.along(mesh, "x", "gemm_t_reduce_x+:all", "gemm_t_reduce_x+", hops, hops + 1)
    west = Transfer.along(mesh, "x", "gemm_t_reduce_x-:all", "gemm_t_reduce_x-", hops + 1, hops)
    return [Route(ring_y.route, (ring_y,)), Route(east.route, (east,)), Route(west.route, (west,))]


@protocol(routes=_routes)
async def gemm_t(tile, *, a: str, b: str, c: str) -> None:
    """C += A . B^T with B's rows moving along the y-ring and partial sums reduced along x."""
    ba, bb, bc = (tile.buffer(n) for n in (a, b, c))
    mt, kt = ba.block
    nt = bb.block[0]
    if bb.block != (nt, kt) or bc.block != (mt, nt):
        raise ProtocolError(f"gemm_t: blocks do not chain: A {ba.block}, B {bb.block}, C {bc.block}; expected A (Mt, Kt), B (Nt, Kt), C (Mt, Nt)")
    mesh = tile.tiling.mesh
    ring_y, roots = gemm_t_plan(mesh)
    tile.alloc("_gemm_t_b2", (nt, kt), bb.dtype.str)
    tile.alloc("_gemm_t_part", (mt, nt), bc.dtype.str)
    cur, nxt = b, "_gemm_t_b2"
    p = mesh.height
    for s in range(p):
        if s < p - 1:
            tile.send(ring_y, cur)  # next B block, hidden behind this step's work
        if not tile.cost_only:
            tile.data("_gemm_t_part")[...] = tile.data(a) @ np.swapaxes(tile.data(cur), -1, -2)
        tile.charge(mt * kt * nt, bc.dtype.name, calls=kt * nt, maps=kt)
        for pair in _reduce_steps(mesh, s):  # chain along x to the row's root column
            live = [t for t in pair if t is not None]
            for t in live:
                tile.send(t, "_gemm_t_part", stream=True)
            await tile.recv(live, "_gemm_t_part", op="add", stream=True)
        is_root = roots[s][tile.rows, None] == tile.cols[None, :]  # [h, w]
        if not tile.cost_only:
            tile.data(c)[is_root] += tile.data("_gemm_t_part")[is_root]
        tile.charge(mt * nt, bc.dtype.name, cores=is_root)
        if s < p - 1:
            await tile.recv(ring_y, nxt)
            cur, nxt = nxt, cur
    if cur != b and not tile.cost_only:
        tile.data(b)[...] = tile.data(cur)
    tile.free("_gemm_t_b2")
    tile.free("_gemm_t_part")
