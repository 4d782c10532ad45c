"""MeshGEMM (WaferLLM §5) and its baselines, Cannon and SUMMA, on a square P x P mesh.

Layout (all three): A (M, K), B (K, N) and C (M, N) are ``Spec("y", "x")``: core (py, px)
holds block (py, px) of each (Mt x Kt, Kt x Nt, Mt x Nt).

``meshgemm``
    Cannon's algorithm on logical rings laid out by INTERLEAVE, so every logical neighbour
    is at most two hops away. Core (py, px) sits at ring place (I, J) = (place[py],
    place[px]). Alignment: A moves I places along the x-ring and B moves J places along
    the y-ring, each row or column going the shorter way round (at most P/2 rounds, A
    and B at once on different links). Then P compute-shift steps: send A to the
    x-ring predecessor and B to the y-ring predecessor (non-blocking), C += A B on the
    current blocks, receive the next blocks into the second buffers. Per step
    ``max(Mt Kt Nt / rate, 2 alpha + tile / w)``: the shift hides behind the compute.
``cannon``
    The same on the physical ring 0 -> 1 -> ... -> P-1 whose wrap-around link spans the
    whole row: the step's critical path is ``(P - 1) alpha`` instead of ``2 alpha``.
``summa``
    P steps; in step k column k multicasts its A block along every row and row k its B
    block down every column, then every core multiplies. Each source needs its own route,
    so a core holds about 2P entries and large meshes fail the routing limit; with
    ``relay=True`` the broadcasts are relayed core to core instead (O(1) routes, each
    relay costs beta).

Double buffers (A and B twice, plus C) are charged to every core's SRAM. ``meshgemm``
and ``cannon`` leave A and B rotated unless ``restore=True`` (one more shift and the
alignment undone, both costed).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Iterator

import numpy as np

from ..errors import ProtocolError
from ..mesh import Mesh
from ..protocol import protocol
from ..transfer import Route, Transfer
from .interleave import ring_order

ALGOS = ("meshgemm", "cannon", "summa")


def check_square(mesh: Mesh, algo: str) -> int:
    """Return P, or refuse a mesh that is not square."""
    if mesh.height != mesh.width:
        raise ValueError(f"{algo} needs a square mesh (P x P cores), got {mesh.height}x{mesh.width}; use a P x P region")
    return mesh.height


def ring_for(algo: str, p: int) -> np.ndarray:
    """Physical positions in ring order: INTERLEAVE for MeshGEMM, 0..P-1 for Cannon."""
    return ring_order(p) if algo == "meshgemm" else np.arange(p)


def _ring_shift(mesh: Mesh, axis: str, ring: np.ndarray, step: int, route: str) -> Transfer:
    """On every line, the core at ring place l receives from place l + step (wrapping)."""
    return Transfer.along(mesh, axis, f"{route}:{step}", route, np.roll(ring, -step), ring)


@lru_cache(maxsize=8)
def cannon_plan(mesh: Mesh, algo: str) -> tuple[dict, list[dict[int, np.ndarray]], Transfer, Transfer]:
    """The alignment shifts, which lines move in each alignment round, and the ring shifts.

    Returns:
        (full alignment transfers by (axis, step), per round {step: bool mask over lines},
        x-ring shift, y-ring shift). A round's transfers are the full ones cut down to the
        lines still moving (``align_round``); they are built on demand, not kept.
    """
    p = check_square(mesh, algo)
    ring = ring_for(algo, p)
    place = np.empty(p, dtype=np.int64)
    place[ring] = np.arange(p)
    # row py must move A place[py] places toward lower ring places; column px moves B place[px]
    need = place  # the same for rows (A) and columns (B) on a square mesh
    forward = need <= p // 2
    full = {
        (axis, step): _ring_shift(mesh, axis, ring, step, f"{algo}_align_{axis}{'<' if step > 0 else '>'}")
        for axis in ("x", "y")
        for step in (+1, -1)
    }
    moving = [{+1: forward & (need > r), -1: ~forward & (p - need > r)} for r in range(p // 2)]
    ring_x = _ring_shift(mesh, "x", ring, +1, f"{algo}_ring_x")
    ring_y = _ring_shift(mesh, "y", ring, +1, f"{algo}_ring_y")
    return full, moving, ring_x, ring_y


def align_round(full: dict, moving: dict[int, np.ndarray], r: int) -> tuple[tuple[Transfer, ...], tuple[Transfer, ...]]:
    """Round r of the alignment: (A transfers along x, B transfers along y)."""
    per_axis = []
    for axis in ("x", "y"):
        ts = []
        for step in (+1, -1):
            if moving[step].any():
                t = full[(axis, step)]
                line = t.dst_y if axis == "x" else t.dst_x
                ts.append(t.subset(moving[step][line], f"{t.key}@{r}"))
        per_axis.append(tuple(ts))
    return tuple(per_axis)


def summa_casts(mesh: Mesh, relay: bool, k: int) -> tuple[Transfer, ...]:
    """Step k of SUMMA: column k multicasts A along the rows, row k multicasts B down the columns."""
    p = check_square(mesh, "summa")
    casts = []
    for axis in ("x", "y"):
        for sign, dst in (("-", np.arange(k)), ("+", np.arange(k + 1, p))):
            if len(dst) == 0:
                continue
            route = f"summa_relay_{axis}{sign}" if relay else f"summa_{axis}{k}{sign}"
            src = np.full(len(dst), k)
            relays = np.abs(dst - k) - 1 if relay else None  # every core on the way relays in software
            casts.append(Transfer.along(mesh, axis, f"{route}:{k}", route, src, dst, relays))
    return tuple(casts)


def _summa_routes(mesh: Mesh, relay: bool) -> Iterator[Route]:
    if relay:  # relayed broadcasts only ever use neighbour hops: receive, then send on
        lines = np.arange(mesh.height)
        for axis in ("x", "y"):
            for sign, step, src in (("+", 1, lines[:-1]), ("-", -1, lines[1:])):
                route = f"summa_relay_{axis}{sign}"
                yield Route(route, (Transfer.along(mesh, axis, f"hop_{axis}{sign}", route, src, src + step),))
        return
    for k in range(mesh.height):  # one route per source and direction: yielded lazily, fails early
        for t in summa_casts(mesh, relay, k):
            yield Route(t.route, (t,))


def _routes(mesh: Mesh, *, a: str, b: str, c: str, algo: str = "meshgemm", relay: bool = False, restore: bool = False) -> Iterable[Route]:
    if algo not in ALGOS:
        raise ValueError(f"gemm algo must be one of {ALGOS}, got {algo!r}")
    if algo == "summa":
        check_square(mesh, algo)
        return _summa_routes(mesh, relay)
    full, moving, ring_x, ring_y = cannon_plan(mesh, algo)
    aligning = [t for xs_ys in align_round(full, moving[0], 0) for t in xs_ys] if moving else []  # later rounds move fewer lines
    by_route = {}
    for t in aligning + ([_reverse(t) for t in aligning] if restore else []) + [ring_x, ring_y]:
        by_route.setdefault(t.route, []).append(t)
    return [Route(n, tuple(ts)) for n, ts in by_route.items()]


def _blocks(tile, a: str, b: str, c: str) -> tuple[int, int, int]:
    ba, bb, bc = (tile._buffer(n) for n in (a, b, c))
    if len(ba.block) != 2 or len(bb.block) != 2 or ba.block[1] != bb.block[0] or bc.block != (ba.block[0], bb.block[1]):
        raise ProtocolError(
            f"gemm: blocks do not chain: A {ba.block}, B {bb.block}, C {bc.block}; expected A (Mt, Kt), "
            f"B (Kt, Nt), C (Mt, Nt)"
        )
    return ba.block[0], ba.block[1], bb.block[1]


def _multiply(tile, a: str, b: str, c: str, mt: int, kt: int, nt: int) -> None:
    """C += A B on every core: Kt rank-1 updates of an Mt x Nt block."""
    if not tile.cost_only:
        tile.data(c)[...] += tile.data(a) @ tile.data(b)
    tile.charge(mt * kt * nt, tile.buffers[c].dtype.name, calls=kt)


@protocol(routes=_routes)
async def mesh_gemm(tile, *, a: str, b: str, c: str, algo: str = "meshgemm", relay: bool = False, restore: bool = False) -> None:
    """C += A . B with ``algo`` (meshgemm, cannon or summa); see the module docstring."""
    mt, kt, nt = _blocks(tile, a, b, c)
    if algo == "summa":
        return await _summa(tile, a, b, c, mt, kt, nt, relay)
    mesh = tile.tiling.mesh
    full, moving, ring_x, ring_y = cannon_plan(mesh, algo)
    rounds = (align_round(full, m, r) for r, m in enumerate(moving))
    await _align(tile, rounds, a, b)  # A along x-rings, B along y-rings, each the shorter way
    dtype_a, dtype_b = tile.buffers[a].dtype.str, tile.buffers[b].dtype.str
    tile.alloc("_gemm_a2", (mt, kt), dtype_a)  # second buffers: receive while computing
    tile.alloc("_gemm_b2", (kt, nt), dtype_b)
    cur_a, cur_b, nxt_a, nxt_b = a, b, "_gemm_a2", "_gemm_b2"
    p = mesh.height
    shifts = p if restore else p - 1
    for s in range(p):
        if s < shifts:  # send A to the x-ring predecessor, B to the y-ring predecessor
            tile.send(ring_x, cur_a)
            tile.send(ring_y, cur_b)
        _multiply(tile, cur_a, cur_b, c, mt, kt, nt)  # overlaps the shift
        if s < shifts:
            await tile.recv(ring_x, nxt_a)
            await tile.recv(ring_y, nxt_b)
            cur_a, nxt_a, cur_b, nxt_b = nxt_a, cur_a, nxt_b, cur_b
    if cur_a != a and not tile.cost_only:  # the blocks ended in the second buffers
        tile.data(a)[...] = tile.data(cur_a)
        tile.data(b)[...] = tile.data(cur_b)
    tile.free("_gemm_a2")
    tile.free("_gemm_b2")
    if restore:  # undo the alignment: the same rounds, the other way
        back = (align_round(full, m, r) for r, m in enumerate(moving))
        await _align(tile, ((tuple(map(_reverse, xs)), tuple(map(_reverse, ys))) for xs, ys in back), a, b)


async def _align(tile, rounds, a: str, b: str) -> None:
    """Run shift rounds: A on the x transfers, B on the y transfers, both at once."""
    for xs, ys in rounds:
        for t in xs:
            tile.send(t, a)
        for t in ys:
            tile.send(t, b)
        await tile.recv(xs, a)
        await tile.recv(ys, b)


def _reverse(t: Transfer) -> Transfer:
    """The same flows backwards, on the route of the opposite direction."""
    route = t.route[:-1] + (">" if t.route.endswith("<") else "<")
    return Transfer.build(t.key + ":back", route, t.mesh, (t.dst_y, t.dst_x), (t.src_y, t.src_x))


async def _summa(tile, a: str, b: str, c: str, mt: int, kt: int, nt: int, relay: bool) -> None:
    mesh = tile.tiling.mesh
    r = tile.rect
    tile.alloc("_summa_a", (mt, kt), tile.buffers[a].dtype.str)
    tile.alloc("_summa_b", (kt, nt), tile.buffers[b].dtype.str)
    for k in range(mesh.height):
        casts = summa_casts(mesh, relay, k)
        xs, ys = [t for t in casts if t.route.startswith("summa_x") or t.route.startswith("summa_relay_x")], []
        ys = [t for t in casts if t not in xs]
        for t in xs:
            tile.send(t, a)
        for t in ys:
            tile.send(t, b)
        if not tile.cost_only:  # the sources use their own blocks
            if r.x0 <= k < r.x1:
                tile.data("_summa_a")[:, k - r.x0] = tile.data(a)[:, k - r.x0]
            if r.y0 <= k < r.y1:
                tile.data("_summa_b")[k - r.y0] = tile.data(b)[k - r.y0]
        await tile.recv(xs, "_summa_a")
        await tile.recv(ys, "_summa_b")
        _multiply(tile, "_summa_a", "_summa_b", c, mt, kt, nt)
    tile.free("_summa_a")
    tile.free("_summa_b")
