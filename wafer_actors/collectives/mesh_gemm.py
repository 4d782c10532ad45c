"""MeshGEMM (WaferLLM §5) and its baselines, Cannon and SUMMA.

Layout (all three): A (M, K), B (K, N) and C (M, N) are ``Spec("y", "x")``: core (py, px)
holds block (py, px) of each. On a ``height x width`` mesh the matrices are cut into an
L x L grid of blocks, L = lcm(height, width) (the paper's N_lcm), so every core holds
``rh x rw`` blocks (rh = L / height, rw = L / width); on a square mesh that is one block.

``meshgemm``
    Cannon's algorithm on logical rings laid out by INTERLEAVE, so every logical neighbour
    is at most two hops away. Block (I, J) sits at ring places (place_y[I], place_x[J]).
    Alignment: block row I of A moves place_y[I] places along the x-ring and block column
    J of B moves place_x[J] places along the y-ring, each the shorter way round (at most
    L/2 rounds, A and B at once on different links). Then L compute-shift steps: send
    the first block column of A to the x-ring predecessor and the first block row of B to
    the y-ring predecessor (non-blocking), C += A B block by block, receive the next
    column and row. Per step ``max(Mt Kt Nt / rate, 2 alpha + part / w)``: the shift hides
    behind the compute.
``cannon``
    The same on the physical ring 0 -> 1 -> ... -> P-1 whose wrap-around link spans the
    whole row: the step's critical path is ``(P - 1) alpha`` instead of ``2 alpha``.
``summa``
    L steps; in step k the core column holding A's k-th block column multicasts it along
    every row and the core row holding B's k-th block row multicasts it down every column,
    then every core multiplies. Each source needs its own route, so a core holds about
    ``height + width`` entries and large meshes fail the routing limit; with ``relay=True``
    the broadcasts are charged as relayed core to core instead: each core on the way adds
    beta, and the routes checked are the neighbour hops a relay chain uses (O(1) per core).
    That baseline is a timing model, not an emulation of the relays: the block still travels
    as one multicast, so no relay core holds it, charges SRAM for it or spends its own clock
    forwarding it (``relay_stages`` counts the charged relays).

On a non-square mesh the x- and y-rings differ, so B's k blocks must be loaded in the
order ``b_row_order`` gives (the host arranges B, as WaferLLM's host pre-skews it;
``ops.gemm`` does this). Receive buffers (one block column of A, one block row of B:
the second buffers of the paper's double buffering) are charged to every core's SRAM.
``meshgemm`` and ``cannon`` leave A and B rotated unless ``restore=True`` (one more
shift and the alignment undone, both costed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Iterator

import numpy as np

from ..errors import InvalidArgument, ProtocolError
from ..mesh import Mesh
from ..protocol import protocol
from ..transfer import Route, Transfer
from .interleave import places, ring_order

ALGOS = ("meshgemm", "cannon", "summa")


def check_square(mesh: Mesh, algo: str) -> int:
    """Return P, or refuse a mesh that is not square."""
    if mesh.height != mesh.width:
        raise InvalidArgument(f"{algo} needs a square mesh (P x P cores), got {mesh.height}x{mesh.width}; use a P x P region")
    return mesh.height


def ring_for(algo: str, p: int) -> np.ndarray:
    """Physical positions in ring order: INTERLEAVE for MeshGEMM, 0..P-1 for Cannon."""
    return ring_order(p) if algo == "meshgemm" else np.arange(p)


def _ring_shift(mesh: Mesh, axis: str, ring: np.ndarray, step: int, route: str) -> Transfer | None:
    """On every line, the core at ring place l receives from place l + step (wrapping).

    None on a line of one core: its ring never leaves the core.
    """
    if len(ring) == 1:
        return None
    return Transfer.along(mesh, axis, f"{route}:{step}", route, np.roll(ring, -step), ring)


@dataclass(frozen=True, eq=False)
class CannonPlan:
    """MeshGEMM/Cannon on a ``height x width`` mesh as Cannon on an L x L grid of blocks.

    L = lcm(height, width): each core holds ``rh x rw`` blocks of A, B and C (rh = L /
    height, rw = L / width), block (a, b) of a core being virtual core (py rh + a,
    px rw + b). The virtual x-ring visits the physical x-ring's cores in order, each core's
    rw columns in a row, so a ring shift moves one column of blocks per core over at most
    two hops (one for Cannon, except its wrap). The same along y.

    Attributes:
        rh, rw, size: blocks per core along y and x, and L.
        full: the physical ring shifts by (axis, step); alignment rounds use subsets.
        a_moving, b_moving: per alignment round, {step: bool over virtual rows (A) or columns (B)}.
        ring_x, ring_y: the shifts of the compute loop.
        b_order: the k block each virtual row of B must hold when loaded (identity on a
            square mesh), so that A's and B's k blocks meet on the two different rings.
    """

    rh: int
    rw: int
    size: int
    full: dict
    a_moving: list
    b_moving: list
    ring_x: Transfer
    ring_y: Transfer
    b_order: np.ndarray


@lru_cache(maxsize=8)
def cannon_plan(mesh: Mesh, algo: str) -> CannonPlan:
    """Plan the alignment rounds and ring shifts of ``meshgemm`` or ``cannon``."""
    ph, pw = mesh.shape
    size = math.lcm(ph, pw)
    rh, rw = size // ph, size // pw
    vring_x = (ring_for(algo, pw)[:, None] * rw + np.arange(rw)).ravel()  # virtual columns in ring order
    vring_y = (ring_for(algo, ph)[:, None] * rh + np.arange(rh)).ravel()
    place_x, place_y = places(vring_x), places(vring_y)
    full = {
        (axis, step): _ring_shift(mesh, axis, ring_for(algo, n), step, f"{algo}_align_{axis}{'<' if step > 0 else '>'}")
        for axis, n in (("x", pw), ("y", ph))
        for step in (+1, -1)
    }

    def rounds(need: np.ndarray) -> list[dict[int, np.ndarray]]:
        forward = need <= size // 2  # the shorter way round
        return [{+1: forward & (need > r), -1: ~forward & (size - need > r)} for r in range(size // 2)]

    return CannonPlan(
        rh, rw, size, full,
        a_moving=rounds(place_y),  # virtual row I moves A by its y-ring place
        b_moving=rounds(place_x),  # virtual column J moves B by its x-ring place
        ring_x=_ring_shift(mesh, "x", ring_for(algo, pw), +1, f"{algo}_ring_x"),
        ring_y=_ring_shift(mesh, "y", ring_for(algo, ph), +1, f"{algo}_ring_y"),
        b_order=vring_x[place_y],
    )


def b_row_order(mesh: Mesh, algo: str) -> np.ndarray:
    """Order in which B's L row blocks must be loaded for ``meshgemm``/``cannon`` (identity if square)."""
    if algo == "summa":
        return np.arange(math.lcm(*mesh.shape))
    return cannon_plan(mesh, algo).b_order


@lru_cache(maxsize=4)  # consecutive k blocks share a source core; whole-mesh multicasts are large
def _summa_cast(mesh: Mesh, relay: bool, axis: str, src: int) -> tuple[Transfer, ...]:
    """The multicast of core ``src`` along ``axis`` to the rest of every line, both ways."""
    casts = []
    for sign, dst in (("-", np.arange(src)), ("+", np.arange(src + 1, mesh.axis_size(axis)))):
        if len(dst):
            route = f"summa_relay_{axis}{sign}" if relay else f"summa_{axis}{src}{sign}"
            relays = np.abs(dst - src) - 1 if relay else None  # every core on the way charged a software relay
            casts.append(Transfer.along(mesh, axis, f"{route}:{src}", route, np.full(len(dst), src), dst, relays))
    return tuple(casts)


def summa_casts(mesh: Mesh, relay: bool, kappa: int) -> tuple[tuple[Transfer, ...], tuple[Transfer, ...]]:
    """Step kappa of SUMMA: the column holding A's k block kappa multicasts it along the rows,
    the row holding B's k block kappa multicasts it down the columns."""
    size = math.lcm(*mesh.shape)
    return _summa_cast(mesh, relay, "x", kappa // (size // mesh.width)), _summa_cast(mesh, relay, "y", kappa // (size // mesh.height))


def _summa_routes(mesh: Mesh, relay: bool) -> Iterator[Route]:
    if relay:  # relayed broadcasts only ever use neighbour hops: receive, then send on
        for axis in ("x", "y"):
            lines = np.arange(mesh.axis_size(axis))
            for sign, step, src in (("+", 1, lines[:-1]), ("-", -1, lines[1:])):
                route = f"summa_relay_{axis}{sign}"
                yield Route(route, (Transfer.along(mesh, axis, f"hop_{axis}{sign}", route, src, src + step),))
        return
    for axis in ("x", "y"):  # one route per source and direction: yielded lazily, fails early
        for src in range(mesh.axis_size(axis)):
            for t in _summa_cast(mesh, relay, axis, src):
                yield Route(t.route, (t,))


def _routes(mesh: Mesh, *, a: str, b: str, c: str, algo: str = "meshgemm", relay: bool = False, restore: bool = False) -> Iterable[Route]:
    if algo not in ALGOS:
        raise InvalidArgument(f"gemm algo must be one of {ALGOS}, got {algo!r}")
    if algo == "summa":
        return _summa_routes(mesh, relay)
    plan = cannon_plan(mesh, algo)
    used = [t for t in (plan.ring_x, plan.ring_y) if t is not None]
    for (axis, step), t in plan.full.items():
        if t is None:
            continue
        moving, per = (plan.a_moving, plan.rh) if axis == "x" else (plan.b_moving, plan.rw)
        for m in moving[:1]:  # round 0 moves every line that ever moves (undoing moves them back)
            lines = m[step] | (m[-step] if restore else False)
            if lines.any():
                used.append(t.subset(lines.reshape(-1, per).any(axis=1)[t.dst_y if axis == "x" else t.dst_x], t.key))
    by_route: dict[str, list[Transfer]] = {}
    for t in used:
        by_route.setdefault(t.route, []).append(t)
    return [Route(n, tuple(ts)) for n, ts in by_route.items()]


def _blocks(tile, a: str, b: str, c: str) -> tuple[int, int, int]:
    """Return (Mt, K, Nt): A's rows and B's columns per core, and the full inner size K."""
    ba, bb, bc = (tile.buffer(n) for n in (a, b, c))
    ph, pw = tile.tiling.mesh.shape
    if len(ba.block) != 2 or len(bb.block) != 2 or ba.block[1] * pw != bb.block[0] * ph or bc.block != (ba.block[0], bb.block[1]):
        raise ProtocolError(
            f"gemm: blocks do not chain: A {ba.block}, B {bb.block}, C {bc.block}; expected A (Mt, K/{pw}), "
            f"B (K/{ph}, Nt), C (Mt, Nt)"
        )
    return ba.block[0], ba.block[1] * pw, bb.block[1]


def _multiply(tile, a: str, b: str, c: str, rh: int = 1, rw: int = 1) -> None:
    """C += A B on every core, block by block: block (i, j) of C takes block (i, j) of A times (i, j) of B.

    With one block per core this is the plain Mt x Kt x Nt product: Kt rank-1 updates, each
    Nt vector instructions Mt long (WaferLLM's CSL), so Kt maps and Kt x Nt compute calls.
    """
    (mt, kt), (_, nt) = tile.buffers[a].block, tile.buffers[b].block
    m, k, n = mt // rh, kt // rw, nt // rw
    if not tile.cost_only:
        h, w = tile.rect.shape
        a6 = tile.data(a).reshape(h, w, rh, m, rw, k).transpose(0, 1, 2, 4, 3, 5)
        b6 = tile.data(b).reshape(h, w, rh, k, rw, n).transpose(0, 1, 2, 4, 3, 5)
        tile.data(c)[...] += (a6 @ b6).transpose(0, 1, 2, 4, 3, 5).reshape(h, w, mt, nt)
    fmacs, dtype, calls, maps = _work(tile, a, b, c, rh, rw)
    tile.charge(fmacs, dtype, calls=calls, maps=maps)


def _work(tile, a: str, b: str, c: str, rh: int, rw: int) -> tuple[int, str, int, int]:
    """One ``_multiply``'s charge: (FMACs, dtype, vector instructions, @maps)."""
    (mt, kt), (_, nt) = tile.buffers[a].block, tile.buffers[b].block
    m, k, n = mt // rh, kt // rw, nt // rw
    return rh * rw * m * k * n, tile.buffers[c].dtype.name, rh * rw * k * n, rh * rw * k


@protocol(routes=_routes)
async def mesh_gemm(tile, *, a: str, b: str, c: str, algo: str = "meshgemm", relay: bool = False, restore: bool = False) -> None:
    """C += A . B with ``algo`` (meshgemm, cannon or summa); see the module docstring."""
    mt, _, nt = _blocks(tile, a, b, c)
    if algo == "summa":
        return await _summa(tile, a, b, c, relay)
    plan = cannon_plan(tile.tiling.mesh, algo)
    rh, rw = plan.rh, plan.rw
    kt = tile.buffers[a].block[1]
    if mt % rh or kt % rw or nt % rw or tile.buffers[b].block[0] % rh:
        raise ProtocolError(f"{algo}: on this {tile.tiling.mesh.height}x{tile.tiling.mesh.width} mesh every block must split into "
                            f"{rh}x{rw} sub-blocks; A {tile.buffers[a].block}, B {tile.buffers[b].block} do not (pad M, K, N to multiples of {plan.size})")
    k = kt // rw  # one sub-block's share of K
    # receive buffers for one column of A blocks and one row of B blocks: the second buffers
    tile.alloc("_gemm_a_in", (mt, k), tile.buffers[a].dtype.str)
    tile.alloc("_gemm_b_in", (k, nt), tile.buffers[b].dtype.str)
    await _align(tile, plan, a, b, k, reverse=False)  # A along x-rings, B along y-rings, the shorter way
    tile.mark(".align")
    shifts = plan.size if restore else plan.size - 1
    everyone = np.ones(tile.rect.shape, dtype=bool)
    first_a, first_b = (slice(None), slice(0, k)), (slice(0, k),)
    if tile.cost_only and _time_steps(tile, plan, a, b, c, shifts, k):
        return await _finish(tile, plan, a, b, k, restore)
    for s in range(plan.size):
        if s < shifts:  # first column of A to the x-ring predecessor, first row of B to the y-ring predecessor
            _send(tile, plan.ring_x, a, first_a, "_gemm_a_in")
            _send(tile, plan.ring_y, b, first_b, "_gemm_b_in")
        _multiply(tile, a, b, c, rh, rw)  # overlaps the shift
        if s < shifts:
            await _recv(tile, plan.ring_x, "_gemm_a_in")
            await _recv(tile, plan.ring_y, "_gemm_b_in")
            _rotate(tile, a, "_gemm_a_in", axis=1, forward=True, rows=_lines(everyone, rh))
            _rotate(tile, b, "_gemm_b_in", axis=0, forward=True, rows=_lines(everyone, rw))
        tile.mark(f".{algo} step")
    await _finish(tile, plan, a, b, k, restore)


async def _finish(tile, plan: CannonPlan, a: str, b: str, k: int, restore: bool) -> None:
    if restore:  # undo the alignment: the same rounds, the other way
        await _align(tile, plan, a, b, k, reverse=True)
        tile.mark(".restore")
    tile.free("_gemm_a_in")
    tile.free("_gemm_b_in")


def _time_steps(tile, plan: CannonPlan, a: str, b: str, c: str, shifts: int, k: int) -> bool:
    """Cost-only, where both rings stay on the tile: time the compute-shift steps at once (``Tile.run_steps``), as
    the loop above does step by step (each step sends A's first column and B's first row, multiplies, receives)."""
    rings = [t for t in (plan.ring_x, plan.ring_y) if t is not None]
    mt, nt = tile.buffers[a].block[0], tile.buffers[b].block[1]
    charge = ("charge", tile.task_cycles(*_work(tile, a, b, c, plan.rh, plan.rw)))
    size = {plan.ring_x: mt * k * tile.buffers[a].dtype.itemsize, plan.ring_y: k * nt * tile.buffers[b].dtype.itemsize}
    script = [*(("send", t, size[t]) for t in rings), charge, *(("land", t) for t in rings)]
    if not tile.run_steps(shifts, script):
        return False
    for _ in range(plan.size - shifts):  # the last step multiplies only
        _multiply(tile, a, b, c, plan.rh, plan.rw)
    return True


def _send(tile, t: Transfer | None, name: str, select: tuple[slice, ...], inbox: str) -> None:
    """Send part of each block along ``t``, or, on a one-core ring, hand it to the core itself."""
    if t is not None:
        tile.send(t, name, select=select)
    elif not tile.cost_only:
        tile.data(inbox)[...] = tile.data(name)[(slice(None), slice(None), *select)]


async def _recv(tile, t: Transfer | None, inbox: str) -> None:
    if t is not None:
        await tile.recv(t, inbox)


def _lines(mask: np.ndarray, per: int) -> np.ndarray:
    """Expand a per-core mask ``[h, w]`` to ``[h, w, per]`` (every block line of a core)."""
    return np.repeat(mask[:, :, None], per, axis=2)


def _local(tile, moving: np.ndarray, axis: str, per: int) -> np.ndarray:
    """Which block lines of each core of the tile move: ``[h, w, per]`` from a mask over virtual lines."""
    shape = tile.rect.shape + (per,)
    if axis == "y":  # virtual rows: the same on every core of a physical row
        return np.broadcast_to(moving.reshape(-1, per)[tile.rows][:, None, :], shape)
    return np.broadcast_to(moving.reshape(-1, per)[tile.cols][None, :, :], shape)


def _rotate(tile, name: str, incoming: str, *, axis: int, forward: bool, rows: np.ndarray) -> None:
    """Shift a core's blocks one place along the ring and take in the received column/row.

    ``axis`` 1: A's block columns move (``rows`` says which of the rh block rows move);
    axis 0: B's block rows move (``rows`` says which of the rw block columns move).
    Forward: everything moves one place toward the start and the received part enters at the end.
    """
    if tile.cost_only:
        return
    data, got = tile.data(name), tile.data(incoming)
    h, w = data.shape[:2]
    per = rows.shape[2]
    if axis == 1:  # (h, w, rh*m, rw*k): rows of blocks are the first block axis
        view = data.reshape(h, w, per, -1, data.shape[3])
        inc = got.reshape(h, w, per, -1, got.shape[3])
        new = np.concatenate([view[..., inc.shape[4]:], inc], axis=4) if forward else np.concatenate([inc, view[..., : -inc.shape[4]]], axis=4)
        view[...] = np.where(rows[:, :, :, None, None], new, view)
    else:  # (h, w, rh*k, rw*n): columns of blocks are the second block axis
        view = data.reshape(h, w, data.shape[2], per, -1)
        inc = got.reshape(h, w, got.shape[2], per, -1)
        new = np.concatenate([view[:, :, inc.shape[2]:], inc], axis=2) if forward else np.concatenate([inc, view[:, :, : -inc.shape[2]]], axis=2)
        view[...] = np.where(rows[:, :, None, :, None], new, view)


async def _align(tile, plan: CannonPlan, a: str, b: str, k: int, *, reverse: bool) -> None:
    """Cannon's skew (or its undoing): block row I of A moves I places, block column J of B moves J.

    Each round moves every line that still has places to go by one, A and B at once. Cost-only, where the rings stay
    on the tile, the rounds are timed as local transfers (no messages, no blocks).
    """
    operands = (("x", a, "_gemm_a_in", plan.a_moving, plan.rh), ("y", b, "_gemm_b_in", plan.b_moving, plan.rw))
    local = tile.cost_only and tile.fuses(*plan.full.values())
    if local and _time_rounds(tile, plan, operands, k, reverse):
        return
    for r in range(len(plan.a_moving)):
        moves = []
        for axis, name, inbox, moving, per in operands:
            total = tile.buffers[name].block[1 if axis == "x" else 0]
            for step in (+1, -1):
                lines = moving[r][step]
                if not lines.any():
                    continue
                go = -step if reverse else step  # undoing a forward move is a backward one
                t = plan.full[(axis, go)]
                if t is not None:
                    phys = lines.reshape(-1, per).any(axis=1)[t.dst_y if axis == "x" else t.dst_x]
                    t = t.subset(phys, f"{t.key}@{r}{'r' if reverse else ''}")
                sel = slice(0, k) if go > 0 else slice(total - k, total)  # the part that leaves this core
                moves.append((t, name, inbox, (slice(None), sel) if axis == "x" else (sel,), axis, go,
                              _local(tile, lines, "y" if axis == "x" else "x", per)))
        started = []
        for t, name, inbox, select, *_ in moves:
            if t is not None and local:
                started.append(tile.start_local(t, tile.buffer(name).part_bytes(select)))
            elif t is not None:
                tile.send(t, name, select=select)
        for t, name, inbox, select, axis, go, rows in moves:  # a core with lines going both ways takes them in turn
            if t is None:
                _send(tile, None, name, select, inbox)  # a one-core ring: the part stays on its core
            elif local:
                tile.land_local(started.pop(0))
            else:
                await tile.recv(t, inbox)
            _rotate(tile, name, inbox, axis=1 if axis == "x" else 0, forward=go > 0, rows=rows)


def _time_rounds(tile, plan: CannonPlan, operands: tuple, k: int, reverse: bool) -> bool:
    """Cost-only, where the rings stay on the tile: time the alignment rounds at once (``Tile.run_steps``), as the
    loop in ``_align`` does round by round. A line moves in a run of first rounds, so each ring shift is one
    transfer whose flows move for as many rounds as their line."""
    script, until = [], {}
    for axis, name, _, moving, per in operands:
        for step in (+1, -1):
            t = plan.full[(axis, -step if reverse else step)]
            rounds = sum(m[step].reshape(-1, per).any(axis=1).astype(np.int64) for m in moving)  # per physical line
            if t is None or not rounds.any():
                continue
            until[t] = np.broadcast_to(rounds[:, None] if axis == "x" else rounds[None, :], tile.tiling.mesh.shape)
            script.append((t, tile.buffer(name).part_bytes((slice(None), slice(0, k)) if axis == "x" else (slice(0, k),))))
    if not script:
        return True
    return tile.run_steps(len(plan.a_moving), [("send", t, nbytes) for t, nbytes in script] +
                          [("land", t) for t, _ in script], until)


async def _summa(tile, a: str, b: str, c: str, relay: bool) -> None:
    """SUMMA over the L = lcm(height, width) k blocks: multicast, then multiply, per block."""
    mesh = tile.tiling.mesh
    size = math.lcm(*mesh.shape)
    rh, rw = size // mesh.height, size // mesh.width
    (mt, kt), (kb, nt) = tile.buffers[a].block, tile.buffers[b].block
    k = kt // rw
    if kt % rw or kb % rh:
        raise ProtocolError(f"summa: K must split into {size} blocks on this mesh; pad K to a multiple of {size}")
    tile.alloc("_summa_a", (mt, k), tile.buffers[a].dtype.str)
    tile.alloc("_summa_b", (k, nt), tile.buffers[b].dtype.str)
    for kappa in range(size):
        xs, ys = summa_casts(mesh, relay, kappa)
        src_x, src_y = kappa // rw, kappa // rh
        a_part = (slice(None), slice((kappa % rw) * k, (kappa % rw + 1) * k))  # k block kappa of A's block
        b_part = (slice((kappa % rh) * k, (kappa % rh + 1) * k),)
        for t in xs:
            tile.send(t, a, select=a_part)
        for t in ys:
            tile.send(t, b, select=b_part)
        lx, ly = tile.local_cols(src_x), tile.local_rows(src_y)
        if not tile.cost_only:  # the sources use their own blocks
            if lx >= 0:
                tile.data("_summa_a")[:, lx] = tile.data(a)[(slice(None), lx, *a_part)]
            if ly >= 0:
                tile.data("_summa_b")[ly] = tile.data(b)[(ly, slice(None), *b_part)]
        await tile.recv(xs, "_summa_a")
        await tile.recv(ys, "_summa_b")
        _multiply(tile, "_summa_a", "_summa_b", c)
        tile.mark(".summa step")
    tile.free("_summa_a")
    tile.free("_summa_b")
