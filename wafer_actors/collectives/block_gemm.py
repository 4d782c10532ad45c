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

Blocks may have any shape: the caller's ``product(a, b, c)`` does one core's work on
``[h, w, *block]`` arrays, and the second buffers (double buffering) are allocated here,
so the SRAM checks see them.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..mesh import Mesh
from ..transfer import Route
from .interleave import places, ring_order
from .mesh_gemm import CannonPlan, cannon_plan, check_square

Product = Callable[[np.ndarray, np.ndarray, np.ndarray], None]


def skewed_plan(mesh: Mesh) -> CannonPlan:
    check_square(mesh, "prefill GEMMs")
    return cannon_plan(mesh, "meshgemm")


def block_gemm_routes(mesh: Mesh) -> list[Route]:
    """The x- and y-rings and the four alignment directions."""
    plan = skewed_plan(mesh)
    ts = [t for t in (plan.ring_x, plan.ring_y, *plan.full.values()) if t is not None]
    return [Route(t.route, (t,)) for t in ts]


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


def _shift(tile, transfer, name: str, twin: str) -> None:
    if transfer is not None:
        tile.send(transfer, name)
    elif not tile.cost_only:  # a one-core ring
        tile.data(twin)[...] = tile.data(name)


async def _land(tile, transfer, twin: str) -> None:
    if transfer is not None:
        await tile.recv(transfer, twin)


def _settle(tile, name: str, current: str, twin: str) -> None:
    """Leave the data under ``name`` (on a core this is only which of the two buffers is current)."""
    if current != name and not tile.cost_only:
        tile.data(name)[...] = tile.data(current)
    tile.free(twin)


async def mesh_gemm_skewed(tile, *, a: str, b: str, c: str, product: Product, fmacs: float, calls: int) -> None:
    """c = a . b with a x-skewed and b y-skewed (c natural); ``product`` adds one step's share."""
    plan = skewed_plan(tile.tiling.mesh)
    ta, tb = _twin(tile, a), _twin(tile, b)
    cur_a, nxt_a, cur_b, nxt_b = a, ta, b, tb
    full = not tile.cost_only
    if full:
        tile.data(c)[...] = 0
    for _ in range(tile.tiling.mesh.height):
        _shift(tile, plan.ring_x, cur_a, nxt_a)
        _shift(tile, plan.ring_y, cur_b, nxt_b)
        if full:
            product(tile.data(cur_a), tile.data(cur_b), tile.data(c))
        tile.charge(fmacs, tile.buffer(c).dtype.name, calls=calls)
        await _land(tile, plan.ring_x, nxt_a)
        await _land(tile, plan.ring_y, nxt_b)
        tile.end_step()
        cur_a, nxt_a, cur_b, nxt_b = nxt_a, cur_a, nxt_b, cur_b
    _settle(tile, a, cur_a, ta)
    _settle(tile, b, cur_b, tb)


async def gemm_t_skewed(tile, *, a: str, b: str, c: str, product: Product, fmacs: float, calls: int) -> None:
    """c = a . b^T with a natural, b (N, K) y-skewed, c x-skewed; ``product`` adds one step's share."""
    plan = skewed_plan(tile.tiling.mesh)
    tb, tc = _twin(tile, b), _twin(tile, c)
    cur_b, nxt_b, cur_c, nxt_c = b, tb, c, tc
    full = not tile.cost_only
    if full:
        tile.data(c)[...] = 0
    for _ in range(tile.tiling.mesh.height):
        _shift(tile, plan.ring_y, cur_b, nxt_b)  # the next B block, hidden behind the product
        if full:
            product(tile.data(a), tile.data(cur_b), tile.data(cur_c))
        tile.charge(fmacs, tile.buffer(c).dtype.name, calls=calls)
        _shift(tile, plan.ring_x, cur_c, nxt_c)  # the partial moves on once this core's share is in
        await _land(tile, plan.ring_y, nxt_b)
        await _land(tile, plan.ring_x, nxt_c)
        tile.end_step()
        cur_b, nxt_b, cur_c, nxt_c = nxt_b, cur_b, nxt_c, cur_c
    _settle(tile, b, cur_b, tb)
    _settle(tile, c, cur_c, tc)


async def skew(tile, names: list[str], *, axis: str, reverse: bool = False) -> None:
    """Skew ``names`` along ``axis`` (``y``: column J moves J places; ``x``: row I moves I), or undo it."""
    plan = skewed_plan(tile.tiling.mesh)
    moving = plan.b_moving if axis == "y" else plan.a_moving
    r = tile.rect
    twins = {n: _twin(tile, n) for n in names}
    for rnd, m in enumerate(moving):
        for step in (+1, -1):
            lines = m[step]
            if not lines.any():
                continue
            go = -step if reverse else step
            t = plan.full[(axis, go)]
            if t is None:
                continue
            t = t.subset(lines[t.dst_x if axis == "y" else t.dst_y], f"{t.key}@{rnd}{'r' if reverse else ''}")
            here = (slice(None), np.flatnonzero(lines[r.x0 : r.x1])) if axis == "y" else (np.flatnonzero(lines[r.y0 : r.y1]),)
            for n in names:
                tile.send(t, n)
            for n in names:
                await tile.recv(t, twins[n])
                if not tile.cost_only:  # only the moving lines took a block
                    tile.data(n)[here] = tile.data(twins[n])[here]
    for twin in twins.values():
        tile.free(twin)
