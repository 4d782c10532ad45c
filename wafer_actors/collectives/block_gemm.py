"""MeshGEMM and GEMM-T on operands kept skewed, moving whole blocks (square meshes; WaferLLM prefill).

WaferLLM's host pre-skews the weights so that MeshGEMM never aligns them. Prefill keeps
its activations skewed too, so no GEMM aligns anything. With the INTERLEAVE ring of a
P x P mesh (``ring``: physical position at each ring place), the core at ring places
(I, J), i.e. physical (ring[I], ring[J]), holds in the

* natural layout: block (ring[I], ring[J]);
* x-skewed layout (MeshGEMM's aligned A): block (ring[I], ring[(I + J) mod P]);
* y-skewed layout (MeshGEMM's aligned B): block (ring[(I + J) mod P], ring[J]).

``mesh_gemm_skewed``
    C (natural) = A (x-skewed) . B (y-skewed): P steps, each sending A to the x-ring
    predecessor and B to the y-ring predecessor (hidden behind the local product). After
    P shifts both are back where they started, so skewed weights stay skewed.
``gemm_t_skewed``
    C (x-skewed) = A (natural) . B^T, B given as (N, K) y-skewed and never transposed.
    A stays; B moves along the y-ring and the partial C blocks along the x-ring, each core
    adding its share of the block passing through. After P steps every partial has
    collected all P shares and sits x-skewed: ready to be the A of the next MeshGEMM, or
    added to an x-skewed activation. No per-step reduction along x.
``skew``
    Move buffers into (or back out of) the y- or x-skewed layout: P/2 rounds of one-place
    ring shifts, each line the shorter way round (Cannon's alignment).

Blocks may have any shape: the caller gives ``product(a, b, c)``, one core's work on
``[h, w, *block]`` arrays, and one step's cost (``fmacs``, ``calls`` vector instructions,
``maps`` loops over a DSD: one per row of B's block); the second buffers (double
buffering) are allocated here, so the SRAM checks see them.
"""

from __future__ import annotations

import weakref
from functools import lru_cache
from typing import Callable

import numpy as np

from ..mesh import Mesh
from ..transfer import Route, Transfer
from .interleave import places, ring_order
from .mesh_gemm import CannonPlan, cannon_plan, check_square

# product(a, ia, b, ib, c): c += one step's share of a . b; core q reads a's block of core ia[q] (None: its own)
Product = Callable[[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None, np.ndarray], None]


def skewed_plan(mesh: Mesh) -> CannonPlan:
    check_square(mesh, "prefill GEMMs")
    return cannon_plan(mesh, "meshgemm")


def block_gemm_routes(mesh: Mesh) -> list[Route]:
    """The x- and y-rings and the four alignment directions."""
    return list(_block_gemm_routes(mesh))


@lru_cache(maxsize=8)
def _block_gemm_routes(mesh: Mesh) -> tuple[Route, ...]:
    plan = skewed_plan(mesh)
    return tuple(Route(t.route, (t,)) for t in (plan.ring_x, plan.ring_y, *plan.full.values()) if t is not None)


def skew_index(p: int) -> np.ndarray:
    """``[row, col]`` -> the block index the skewed layouts put there: ring[(place[row] + place[col]) mod P]."""
    ring = ring_order(p)
    place = places(ring)
    return ring[(place[:, None] + place[None, :]) % p]


def _twin(tile, name: str) -> str:
    """Allocate the second buffer of ``name`` (what its next block arrives in)."""
    buf = tile.buffer(name)
    twin = f"_twin_{name}"
    tile.alloc(twin, buf.block, buf.dtype.str)
    return twin


def gathered(blocks: np.ndarray, order: np.ndarray | None) -> np.ndarray:
    """The blocks each core holds (a copy when an index says they lie elsewhere)."""
    if order is None:
        return blocks
    return blocks.reshape((order.size, -1))[order].reshape(blocks.shape)


RING_ORDERS_BYTES = 64 << 20  # a tile keeps a ring's orders up to this size (a 120 x 120 ring's: 14 MB)


class _RingOrders:
    """The successive ``_Operand.order`` of a ring on one tile, kept as a GEMM first needs them (read-only): every
    GEMM of every layer on the ring takes the same ones. Past ``RING_ORDERS_BYTES`` (a large mesh) the later ones
    are computed each time."""

    def __init__(self, tile, transfer):
        self._src, self._dst = tile.local_flows(transfer)
        self.first = np.arange(tile.clock.size)
        self.first.flags.writeable = False
        self._kept = [self.first]
        self._next = {id(self.first): 1}  # a kept order -> the index of the one after it

    def after(self, order: np.ndarray) -> np.ndarray:
        """The order one shift after ``order``."""
        i = self._next.get(id(order))
        if i is not None and i < len(self._kept):
            return self._kept[i]
        nxt = order.copy()
        nxt[self._dst] = order[self._src]
        if i is not None and (i + 1) * nxt.nbytes <= RING_ORDERS_BYTES:
            nxt.flags.writeable = False
            self._kept.append(nxt)
            self._next[id(nxt)] = i + 1
        return nxt


_rings: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tile -> {(transfer key, view): (transfer, orders)}


def _ring_orders(tile, transfer) -> _RingOrders:
    kept = _rings.setdefault(tile, {})
    key = (transfer.key, tile.index, tile.rect)
    got = kept.get(key)
    if got is None or got[0] is not transfer:
        got = kept[key] = (transfer, _RingOrders(tile, transfer))
    return got[1]


class _Operand:
    """An operand whose blocks move one place along ``transfer`` (a ring shift) every step.

    Step by step it is double-buffered: send, then receive into the second buffer, which
    becomes current. With the fused executor, when the ring stays inside the tile, the
    blocks do not move at all: an index follows them (``order[core]``: the core whose
    block is there now), which the product reads through (``indexed``), or they move in one
    copy (otherwise, for an operand the product writes).
    """

    def __init__(self, tile, name: str, transfer, *, indexed: bool = True):
        self.tile, self.name, self.transfer = tile, name, transfer
        self.twin = _twin(tile, name)
        self.cur, self.nxt = name, self.twin
        self.fused = tile.fuses(transfer)
        indexed = indexed and self.fused and transfer is not None and not tile.cost_only  # cost-only: no blocks to find
        self.orders = _ring_orders(tile, transfer) if indexed else None
        self.order = self.orders.first if indexed else None
        self.started: tuple = ()
        self.timed = False  # the tile timed every step's send and land already (``Tile.run_steps``)
        self.still: np.ndarray | None = None  # the blocks read in place, as one contiguous array

    def blocks(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(the blocks ``[h, w, *block]``, the flat core whose block each core holds now; None: its own)."""
        if self.order is None:
            return self.tile.data(self.cur), None
        if self.still is None:  # they stay put; a view (a column chunk) is copied once: the kernels read it ~9x slower
            self.still = np.ascontiguousarray(self.tile.data(self.cur))
        return self.still, self.order

    def send(self) -> None:
        t, tile = self.transfer, self.tile
        if t is None:  # a one-core ring
            if not tile.cost_only:
                tile.data(self.nxt)[...] = tile.data(self.cur)
        elif self.fused:
            if self.order is None:
                tile.move_local(t, self.cur, self.nxt)
            if not self.timed:
                self.started = tile.start_local(t, tile.buffer(self.cur).nbytes)
        else:
            tile.send(t, self.cur)

    async def land(self) -> None:
        t, tile = self.transfer, self.tile
        if self.fused and t is not None:
            if self.started:
                tile.land_local(self.started)
            if self.order is not None:
                self.order = self.orders.after(self.order)
                return  # the blocks stayed in the current buffer
        elif t is not None:
            await tile.recv(t, self.nxt)
        self.cur, self.nxt = self.nxt, self.cur

    def finish(self) -> None:
        """Leave the blocks under ``name`` where the steps put them, and free the second buffer."""
        tile = self.tile
        if not tile.cost_only:
            if self.order is not None and (self.order != np.arange(self.order.size)).any():
                tile.data(self.name)[...] = gathered(*self.blocks())
            elif self.cur != self.name:
                tile.data(self.name)[...] = tile.data(self.cur)
        tile.free(self.twin)


async def mesh_gemm_skewed(tile, *, a: str, b: str, c: str, product: Product, fmacs: float, calls: int, maps: int) -> None:
    """c = a . b with a x-skewed and b y-skewed (c natural); ``product`` adds one step's share."""
    plan = skewed_plan(tile.tiling.mesh)
    ops = _Operand(tile, a, plan.ring_x), _Operand(tile, b, plan.ring_y)
    dtype = tile.buffer(c).dtype.name
    timed = _time_steps(tile, ops, [("send", ops[0]), ("send", ops[1]), ("charge", fmacs, dtype, calls, maps),
                                    ("land", ops[0]), ("land", ops[1])])
    full = not tile.cost_only
    if full:
        out = tile.data(c)
        acc = out if out.flags.c_contiguous else np.empty_like(out, order="C")  # as the blocks read (``_Operand.blocks``)
        acc[...] = 0
    for _ in range(tile.tiling.mesh.height):
        for op in ops:  # A to the x-ring predecessor, B to the y-ring predecessor, hidden behind the product
            op.send()
        if full:
            product(*ops[0].blocks(), *ops[1].blocks(), acc)
        if not timed:
            tile.charge(fmacs, dtype, calls=calls, maps=maps)
        for op in ops:
            await op.land()
        tile.mark(".meshgemm step")
    if full and acc is not out:
        out[...] = acc
    for op in ops:
        op.finish()


async def gemm_t_skewed(tile, *, a: str, b: str, c: str, product: Product, fmacs: float, calls: int, maps: int) -> None:
    """c = a . b^T with a natural, b (N, K) y-skewed, c x-skewed; ``product`` adds one step's share."""
    plan = skewed_plan(tile.tiling.mesh)
    ob, oc = _Operand(tile, b, plan.ring_y), _Operand(tile, c, plan.ring_x, indexed=False)
    dtype = tile.buffer(c).dtype.name
    timed = _time_steps(tile, (ob, oc), [("send", ob), ("charge", fmacs, dtype, calls, maps), ("send", oc), ("land", ob),
                                         ("land", oc)])
    full = not tile.cost_only
    if full:
        tile.data(c)[...] = 0
    for _ in range(tile.tiling.mesh.height):
        ob.send()  # the next B block, hidden behind the product
        if full:
            product(tile.data(a), None, *ob.blocks(), tile.data(oc.cur))
        if not timed:
            tile.charge(fmacs, dtype, calls=calls, maps=maps)
        oc.send()  # the partial moves on once this core's share is in
        await ob.land()
        await oc.land()
        tile.mark(".gemm-t step")
    ob.finish()
    oc.finish()


def _time_steps(tile, ops: tuple[_Operand, ...], script: list[tuple]) -> bool:
    """Time all the compute-shift steps of a GEMM at once where its rings stay on the tile (``Tile.run_steps``):
    ``script`` is one step's sends, charge and lands of ``ops``; the steps then move only data."""
    if not all(op.fused for op in ops):
        return False
    steps = []
    for kind, *what in script:
        if kind == "charge":
            steps.append(("charge", tile.task_cycles(*what)))
        elif what[0].transfer is not None:  # (a one-core ring moves nothing)
            op = what[0]
            steps.append((kind, op.transfer, tile.buffer(op.cur).nbytes) if kind == "send" else (kind, op.transfer))
    if not tile.run_steps(tile.tiling.mesh.height, steps):
        return False
    for op in ops:
        op.timed = True
    return True


SKEW_CACHE_FLOWS = 20_000_000  # skew rounds kept for the next layer: a small mesh's all, a 720 x 720 one's not
_skew_cache: dict[tuple, Transfer | None] = {}
_skew_cache_flows = 0


def _skew_round(mesh: Mesh, axis: str, rnd: int, step: int, reverse: bool) -> Transfer | None:
    """The flows of one skew round: the lines still moving, one ring place the ``step`` way (or back).

    Cached by size, not count: a 720 x 720 mesh's rounds (about 1,400) hold up to half a million
    flows each, more than a host should keep at once.
    """
    global _skew_cache_flows
    key = (mesh, axis, rnd, step, reverse)
    if key in _skew_cache:
        return _skew_cache[key]
    plan = skewed_plan(mesh)
    lines = (plan.b_moving if axis == "y" else plan.a_moving)[rnd][step]
    t = plan.full[(axis, -step if reverse else step)]
    if t is not None:
        t = t.subset(lines[t.dst_x if axis == "y" else t.dst_y], f"{t.key}@{rnd}{'r' if reverse else ''}")
    size = 0 if t is None else len(t)
    if _skew_cache_flows + size > SKEW_CACHE_FLOWS:
        _skew_cache.clear()
        _skew_cache_flows = 0
    _skew_cache[key] = t
    _skew_cache_flows += size
    return t


async def skew(tile, names: list[str], *, axis: str, reverse: bool = False) -> None:
    """Skew ``names`` along ``axis`` (``y``: column J moves J places; ``x``: row I moves I), or undo it.

    Fused, inside the tile: the rounds are timed at once (``Tile.shift_lines``) and the blocks move once, at the end.
    """
    plan = skewed_plan(tile.tiling.mesh)
    moving = plan.b_moving if axis == "y" else plan.a_moving
    twins = {n: _twin(tile, n) for n in names}
    whole = [plan.full[(axis, -step if reverse else step)] for step in (+1, -1)]  # every round is a part of one
    until = sum(np.array([m[step] for step in (+1, -1)], dtype=np.int64) for m in moving)  # [step, line]: first rounds
    order = None if tile.cost_only or whole[0] is None else np.arange(tile.clock.size)
    nbytes = [tile.buffer(n).nbytes for n in names]
    if whole[0] is None or tile.fuses(*whole) and tile.shift_lines(whole, axis, until, nbytes, order):
        rounds = ()  # timed (a one-core ring moves nothing)
    else:
        order, rounds = None, (t for rnd, m in enumerate(moving) for step in (+1, -1) if m[step].any()
                               for t in [_skew_round(tile.tiling.mesh, axis, rnd, step, reverse)] if t is not None)
    for t in rounds:
        for n in names:
            tile.send(t, n)
        lines = np.zeros(tile.tiling.mesh.axis_size("x" if axis == "y" else "y"), dtype=bool)
        lines[t.dst_x if axis == "y" else t.dst_y] = True
        here = (slice(None), np.flatnonzero(lines[tile.cols])) if axis == "y" else (np.flatnonzero(lines[tile.rows]),)
        for n in names:
            await tile.recv(t, twins[n])
            if not tile.cost_only:  # only the moving lines took a block
                tile.data(n)[here] = tile.data(twins[n])[here]
    if order is not None:
        for n in names:
            data = tile.data(n)
            data[...] = data.reshape(order.size, -1)[order].reshape(data.shape)
    for twin in twins.values():
        tile.free(twin)
