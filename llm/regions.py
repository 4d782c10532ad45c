"""A model's regions on one wafer: where they lie, and how the activation moves from each to the next.

Regions of ``h x w`` cores go in snake order over the fabric: along the first row of regions,
back along the second, and so on, so each region shares an edge with the next (the next one
lies east, west or south). The wafer is the rectangle they span; one clock per core, one
fabric: the hand-off between two regions is a transfer like any other, its routes counted
against each core's routing entries and its links shared.

Decode hand-off (``handoff_program``): x is laid out ``Spec("y")`` (row ``py`` of a region
holds block ``py`` on every column), and so is the next region's. Next region east (west):
each row's edge core on that side multicasts its block along its row over the next region, one
stream per row, ``w`` hops to the far core. Next region south: block ``py`` goes straight down
column ``py`` (``py mod w``) from row ``py`` of this region to row ``py`` of the next (``h``
hops), then from there along the row both ways (two steps).

Prefill crossing (``crossing_program``): the prompt's activations are ``Spec("y", "x")``, so
every core hands its block to the core at the same place in the next region: ``w`` (or ``h``)
hops each, the flows of a row (column) sharing the links across the edge.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from wafer_actors.mesh import Mesh
from wafer_actors.program import Program, Step
from wafer_actors.protocol import protocol
from wafer_actors.transfer import Route, Transfer

from .decode_protocol import decode_step

Origin = tuple[int, int]


def snake(fabric: tuple[int, int], shape: tuple[int, int], n: int) -> tuple[Origin, ...]:
    """Top-left cores of ``n`` regions of ``shape`` in snake order over a ``fabric`` of cores (``[]`` if none fits a row)."""
    per_row = fabric[1] // shape[1]
    out = []
    for i in range(n):
        r, c = divmod(i, per_row)
        out.append((r * shape[0], (c if r % 2 == 0 else per_row - 1 - c) * shape[1]))
    return tuple(out)


def span(shape: tuple[int, int], origins: tuple[Origin, ...]) -> tuple[int, int]:
    """The wafer (rows, columns from core (0, 0)) that regions of ``shape`` at ``origins`` need."""
    return max(y for y, _ in origins) + shape[0], max(x for _, x in origins) + shape[1]


def _side(a: Origin, b: Origin, shape: tuple[int, int]) -> str:
    """Where region ``b`` lies from its neighbour ``a``: ``east``, ``west`` or ``south``."""
    (ay, ax), (by, bx), (h, w) = a, b, shape
    for side, (dy, dx) in {"east": (0, w), "west": (0, -w), "south": (h, 0)}.items():
        if (by - ay, bx - ax) == (dy, dx):
            return side
    raise ValueError(f"regions at {a} and {b} of {h}x{w} cores are not neighbours in snake order")


@lru_cache(maxsize=64)
def handoff_program(wafer: Mesh, shape: tuple[int, int], a: Origin, b: Origin) -> Program:
    """x (``Spec("y")``) from the region at ``a`` to its neighbour at ``b`` (see the module docstring)."""
    (ay, ax), (by, bx), (h, w) = a, b, shape
    side, key = _side(a, b, shape), f"handoff:{a}->{b}"
    rows = np.arange(h)
    ys, xs = np.repeat(rows, w), np.tile(np.arange(w), h)  # every core of the next region
    if side != "south":
        edge = ax + w - 1 if side == "east" else ax
        t = Transfer.build(key, key, wafer, (ay + ys, np.full(h * w, edge)), (by + ys, bx + xs))
        return Program(key, (Step((t,)),), phases=1)
    col = rows % w
    down = Transfer.build(f"{key}:down", key, wafer, (ay + rows, ax + col), (by + rows, bx + col))
    keep = xs != col[ys]  # the core that came down holds its block already
    along = Transfer.build(f"{key}:along", key, wafer, (by + ys[keep], bx + col[ys[keep]]), (by + ys[keep], bx + xs[keep]))
    return Program(key, (Step((down,)), Step((along,))), phases=2)


@lru_cache(maxsize=64)
def crossing_program(wafer: Mesh, shape: tuple[int, int], a: Origin, b: Origin) -> Program:
    """Every core's block (``Spec("y", "x")``) of the region at ``a`` to the same core of its neighbour at ``b``."""
    (ay, ax), (by, bx), (h, w) = a, b, shape
    key = f"crossing:{a}->{b}"
    _side(a, b, shape)
    ys, xs = np.repeat(np.arange(h), w), np.tile(np.arange(w), h)
    t = Transfer.build(key, key, wafer, (ay + ys, ax + xs), (by + ys, bx + xs))
    return Program(key, (Step((t,)),), phases=1)


def _pairs(origins: tuple) -> list[tuple[Origin, Origin]]:
    return [(tuple(a), tuple(b)) for a, b in zip(origins, origins[1:])]


def _plan_key(plans: list[dict]) -> tuple:
    return tuple(tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in p.items())) for p in plans)


@lru_cache(maxsize=16)
def _decode_routes(wafer: Mesh, shape: tuple[int, int], origins: tuple, plans: tuple) -> tuple[Route, ...]:
    """The same objects for every token (decode's routes do not depend on the position), so the wafer counts
    them once."""
    region = Mesh(*shape)
    out = [Route(r.name, r.transfers, at) for plan, at in zip(plans, origins)
           for r in decode_step.routes(region, plan=dict(plan), pos=0)]
    for a, b in _pairs(origins):
        p = handoff_program(wafer, shape, a, b)
        out.append(Route(p.key, tuple(t for s in p.steps for t in s.transfers)))
    return tuple(out)


def _regions_routes(mesh: Mesh, *, plans: list[dict], pos: int, shape: tuple, origins: tuple) -> tuple[Route, ...]:
    origins = tuple(tuple(o) for o in origins)
    return _decode_routes(mesh, tuple(shape), origins, _plan_key(plans))


@protocol(routes=_regions_routes)
async def decode_regions(tile, *, plans: list[dict], pos: int, shape: tuple, origins: tuple) -> None:
    """One decode step through every region of the wafer: each region runs its layers on the x handed over by the
    one before (region 0's x comes from the host), and hands its own x on; the last one ends with the logits."""
    origins = tuple(tuple(o) for o in origins)
    pairs, r = _pairs(origins), tile.region
    if r:
        with tile.on_wafer():
            await tile.exchange(handoff_program(tile.tiling.mesh, tuple(shape), *pairs[r - 1]), "x")
        tile.stamp(f"begin:{r}")
    await decode_step.body(tile, plan=plans[r], pos=pos)
    tile.stamp(f"end:{r}")
    if r < len(pairs):
        with tile.on_wafer():
            await tile.exchange(handoff_program(tile.tiling.mesh, tuple(shape), *pairs[r]), "x")


def _crossing_routes(mesh: Mesh, *, shape: tuple, a: tuple, b: tuple) -> list[Route]:
    p = crossing_program(mesh, tuple(shape), tuple(a), tuple(b))
    return [Route(p.key, tuple(t for s in p.steps for t in s.transfers))]


@protocol(routes=_crossing_routes)
async def prefill_crossing(tile, *, shape: tuple, a: tuple, b: tuple) -> None:
    """The prompt's activations (``xp``) from the region at ``a`` to the one at ``b`` (the other regions wait)."""
    if tile.origin not in (tuple(a), tuple(b)):
        return
    with tile.on_wafer():
        await tile.exchange(crossing_program(tile.tiling.mesh, tuple(shape), tuple(a), tuple(b)), "xp")
