"""Allreduce along a mesh axis: the K-tree of MeshGEMV and its baselines.

Every algorithm combines the blocks held by the ``n`` cores of each line along ``axis``
(every row for ``"x"``, every column for ``"y"``) and, with ``broadcast``, leaves the
result on all of them. Blocks are combined elementwise with ``add`` or ``max``.

``ktree`` (WaferLLM §6.2, K = 2 by default)
    Phase 1 cuts the line into ``group_num`` groups of consecutive cores; each group
    streams toward its middle core, one software relay (``beta``) and one hop per step.
    Phase j repeats this over the roots of phase j-1, which are ``g`` cores apart and
    linked by pass-through routes (``g * alpha`` per step, no relay in between). The
    root of the last phase multicasts the result back along the line. Critical path:
    about ``g/2 + G/2`` relay stages (``2 sqrt(n) / 2 = sqrt(n)`` at the best G) and
    ``n`` hops.
``chain``
    One chain to the middle core, then the multicast (single-phase, as in prefill).
``pipeline``
    One chain from the first core to the last, then the multicast back: ``n - 1`` relay
    stages and ``2 (n - 1)`` hops (the vendor GEMV's allreduce).
``ring``
    Reduce-scatter then allgather on the INTERLEAVE ring (every ring link at most two
    hops): the block is cut into ``n`` chunks; ``2 (n - 1)`` steps, each one relay and up
    to two hops, ``O((2 alpha + beta) n)``.

Messages per step: at most one flow per core, at most one message per pair of tiles.
Routes: ``2K + 2`` for the K-tree (reduce up and down per phase, multicast both ways).
"""

from __future__ import annotations

import math
import zlib
from functools import lru_cache

import numpy as np

from ..errors import InvalidArgument
from ..mesh import Mesh, even_bounds
from ..program import Program, Step
from ..protocol import protocol
from ..transfer import Route, Transfer
from .interleave import places, ring_order

OPS = ("add", "max")
ALGOS = ("ktree", "chain", "pipeline", "ring")

Pair = tuple[Transfer | None, Transfer | None]  # (toward higher index, toward lower index)


# ---- planning (pure functions of the mesh; the same on every tile) -------------------------
def relay_stages(sizes: list[int]) -> int:
    """Relay stages of a chain phase whose groups have these sizes (root in the middle)."""
    return max(max(s // 2, s - 1 - s // 2) for s in sizes)


@lru_cache(maxsize=64)
def default_group_num(n: int) -> int:
    """Pick the group count with the fewest relay stages over both phases, nearest sqrt(n) on ties."""

    def cost(g: int) -> tuple[int, float]:  # the stages grow with the size, so the longest of the even groups decides
        return relay_stages([-(-n // g)]) + relay_stages([g]), abs(g - math.sqrt(n))

    return min(range(1, n + 1), key=cost)


@lru_cache(maxsize=128)
def tree_phases(n: int, k: int, group_num: int | None) -> tuple[tuple[tuple[np.ndarray, int], ...], ...]:
    """Groups of each K-tree phase: (member positions along the axis, index of the root member).

    Raises:
        ValueError: ``k`` < 1, or ``group_num`` outside [1, n].
    """
    if not isinstance(k, int) or k < 1:
        raise InvalidArgument(f"K must be a positive integer, got {k!r}")
    if group_num is not None and (not isinstance(group_num, (int, np.integer)) or not 1 <= group_num <= n):
        raise InvalidArgument(f"group_num must be an integer in [1, {n}] for {n} cores along the axis, got {group_num!r}")
    branching = max(2, round(n ** (1 / k)))  # group size of the middle phases when K > 2
    members = np.arange(n)
    phases = []
    for phase in range(k):
        if phase == k - 1:
            groups = 1
        elif phase == 0 and group_num is not None:
            groups = int(group_num)
        elif k == 2:
            groups = default_group_num(n)
        else:
            groups = max(1, round(len(members) / branching))
        b = even_bounds(len(members), groups)
        phase_groups = tuple((members[b[i] : b[i + 1]], (b[i + 1] - b[i]) // 2) for i in range(groups))
        phases.append(phase_groups)
        members = np.array([g[r] for g, r in phase_groups])
    return tuple(phases)


def chain_steps(mesh: Mesh, axis: str, name: str, groups, lines: np.ndarray | None = None) -> list[Pair]:
    """Steps of a streaming chain reduction inside each group toward its root member.

    Args:
        groups: (member positions along ``axis``, index of the root member) per group.
        lines: the line (index along the other axis) of each group; None repeats every
            group on every line.

    Each side of a root is a chain of relays; the shorter side starts later (in steps, not
    in cycles) so that both streams reach the root in the last step, where it takes them at
    once. Step s of a group with ``lo`` members below the root and ``hi`` above, over ``T``
    steps: member ``s - (T - lo)`` sends up, member ``k - 1 - (s - (T - hi))`` sends down.
    """
    longest = max(max(r, len(m) - 1 - r) for m, r in groups)
    where = [None] * len(groups) if lines is None else list(lines)
    steps = []
    for s in range(longest):
        up, down = [], []
        for (m, r), line in zip(groups, where):
            lo, hi = r, len(m) - 1 - r
            if s >= longest - lo:
                i = s - (longest - lo)
                up.append((line, m[i], m[i + 1]))
            if s >= longest - hi:
                i = len(m) - 1 - (s - (longest - hi))
                down.append((line, m[i], m[i - 1]))
        steps.append(tuple(_flows(mesh, axis, f"{route}:{s}", route, flows, lines is None) for route, flows in ((f"{name}+", up), (f"{name}-", down))))
    return steps


def _flows(mesh: Mesh, axis: str, key: str, route: str, flows: list, every_line: bool) -> Transfer | None:
    """A transfer of (line, src, dst) flows along ``axis`` (on every line if ``every_line``)."""
    if not flows:
        return None
    line, src, dst = (np.array(v) for v in zip(*flows))
    key = f"{key}:{zlib.crc32(np.stack([src, dst]).tobytes() + (b'' if every_line else line.tobytes()))}"
    if every_line:
        return Transfer.along(mesh, axis, key, route, src, dst)
    if axis == "x":
        return Transfer.build(key, route, mesh, (line, src), (line, dst))
    return Transfer.build(key, route, mesh, (src, line), (dst, line))


def multicast(mesh: Mesh, axis: str, root: int) -> tuple[Transfer, ...]:
    """The root's one-shot multicast to every other core of its line, both ways."""
    n = mesh.axis_size(axis)
    casts = []
    for route, dst in ((f"bcast_{axis}-", np.arange(root)), (f"bcast_{axis}+", np.arange(root + 1, n))):
        if len(dst):
            casts.append(Transfer.along(mesh, axis, f"{route}:{root}", route, np.full(len(dst), root), dst))
    return tuple(casts)


@lru_cache(maxsize=128)
def plan(mesh: Mesh, axis: str, algo: str, k: int, group_num: int | None, root: int | None, broadcast: bool):
    """Plan a tree-like allreduce: (list of phases, each a list of steps; multicast transfers).

    Raises:
        ValueError: unknown algorithm or a root off the axis.
    """
    n = mesh.axis_size(axis)
    if algo not in ALGOS:
        raise InvalidArgument(f"allreduce algo must be one of {ALGOS}, got {algo!r}")
    if algo == "ktree":
        phases = tree_phases(n, k, group_num)
    else:
        if root is None:
            root = n - 1 if algo == "pipeline" else n // 2
        if not isinstance(root, (int, np.integer)) or not 0 <= root < n:
            raise InvalidArgument(f"root must be a core index along {axis!r} in [0, {n - 1}], got {root!r}")
        phases = (((np.arange(n), int(root)),),)
    steps = [chain_steps(mesh, axis, f"reduce{i + 1}_{axis}", groups) for i, groups in enumerate(phases)]
    last_members, last_root = phases[-1][0]
    casts = multicast(mesh, axis, int(last_members[last_root])) if broadcast else ()
    return steps, casts


@lru_cache(maxsize=64)
def ring_plan(mesh: Mesh, axis: str) -> tuple[Transfer, np.ndarray]:
    """The INTERLEAVE ring step (every core sends to its ring successor) and each core's ring place."""
    n = mesh.axis_size(axis)
    ring = ring_order(n)
    return Transfer.along(mesh, axis, f"ring_{axis}", f"ring_{axis}", ring, np.roll(ring, -1)), places(ring)


def allreduce_routes(mesh: Mesh, *, axis: str, op: str = "add", algo: str = "ktree", K: int = 2,
                     group_num: int | None = None, root: int | None = None, broadcast: bool = True, **_) -> list[Route]:
    """Routes of an allreduce (validates every argument before anything runs)."""
    if op not in OPS:
        raise InvalidArgument(f"op must be one of {OPS}, got {op!r}")
    return list(_routes(mesh, axis, algo, K, group_num, root, broadcast))


@lru_cache(maxsize=128)
def _routes(mesh: Mesh, axis: str, algo: str, k: int, group_num: int | None, root: int | None, broadcast: bool) -> tuple[Route, ...]:
    if algo == "ring":
        if mesh.axis_size(axis) < 2:
            return ()
        return (Route(f"ring_{axis}", (ring_plan(mesh, axis)[0],)),)
    steps, casts = plan(mesh, axis, algo, k, group_num, root, broadcast)
    by_route: dict[str, list[Transfer]] = {}
    for t in [t for phase in steps for pair in phase for t in pair if t is not None] + list(casts):
        by_route.setdefault(t.route, []).append(t)
    return tuple(Route(name, tuple(ts)) for name, ts in by_route.items())


@lru_cache(maxsize=128)
def program(mesh: Mesh, axis: str, algo: str, k: int, group_num: int | None, root: int | None, broadcast: bool,
            op: str) -> Program:
    """The steps of a tree-like allreduce: each phase's chain steps toward the roots, then the multicast."""
    steps, casts = plan(mesh, axis, algo, k, group_num, root, broadcast)
    chain = [Step(tuple(t for t in pair if t is not None), op, stream=True) for phase in steps for pair in phase]
    key = f"allreduce:{mesh.height}x{mesh.width}:{axis}:{algo}:{k}:{group_num}:{root}:{broadcast}:{op}"
    return Program(key, tuple(chain) + ((Step(casts),) if casts else ()), sum(1 for p in steps if p) + bool(casts))


@lru_cache(maxsize=128)
def phase_programs(mesh: Mesh, axis: str, algo: str, k: int, group_num: int | None, root: int | None, broadcast: bool,
                   op: str) -> tuple[tuple[str, Program], ...]:
    """``program`` cut at its phases, each named: run one after another they are the same steps (a trace marks
    the end of each)."""
    whole = program(mesh, axis, algo, k, group_num, root, broadcast, op)
    steps, casts = plan(mesh, axis, algo, k, group_num, root, broadcast)
    out, first = [], 0
    for i, phase in enumerate(p for p in steps if p):
        out.append((f"allreduce phase {i + 1}", Program(f"{whole.key}:phase{i}", whole.steps[first : first + len(phase)])))
        first += len(phase)
    if casts:
        out.append(("broadcast", Program(f"{whole.key}:broadcast", whole.steps[first:])))
    return tuple(out)


# ---- tile bodies ----------------------------------------------------------------------------
async def run_allreduce(tile, *, buffer: str, axis: str, op: str = "add", algo: str = "ktree", K: int = 2,
                        group_num: int | None = None, root: int | None = None, broadcast: bool = True) -> None:
    """Allreduce ``buffer`` along ``axis`` (see the module docstring for the algorithms).

    Tree-like algorithms: every chain step sends toward the roots (relays forward the
    stream they are combining) and combines while streaming; the last root multicasts the
    result both ways.
    """
    if algo == "ring":
        return await _ring(tile, buffer, axis, op)
    prog = program(tile.tiling.mesh, axis, algo, K, group_num, root, broadcast, op)
    tile.switch_tasks(prog.phases)
    if not tile.tracing:
        await tile.exchange(prog, buffer)
        return
    tile.mark(".compute")  # what the operation did before its allreduce
    for name, part in phase_programs(tile.tiling.mesh, axis, algo, K, group_num, root, broadcast, op):
        await tile.exchange(part, buffer)
        tile.mark(f".{name}")


async def _ring(tile, buffer: str, axis: str, op: str) -> None:
    """Reduce-scatter then allgather on the INTERLEAVE ring, one chunk per step."""
    mesh = tile.tiling.mesh
    n = mesh.axis_size(axis)
    if n < 2:
        return
    step, place = ring_plan(mesh, axis)
    tile.switch_tasks(2)  # reduce-scatter, allgather
    tile.mark(".compute")
    buf = tile.buffers[buffer]
    size = math.prod(buf.block)
    chunk = -(-size // n)
    tile.alloc("_ring_work", (n, chunk), buf.dtype.str)
    tile.alloc("_ring_msg", (chunk,), buf.dtype.str)
    ax = "yx".index(axis)
    r = tile.rect
    my_place = place[tile.rows][:, None] if ax == 0 else place[tile.cols][None, :]  # ring place of each core
    my_place = np.broadcast_to(my_place, r.shape)
    rows, cols = np.indices(r.shape)
    if not tile.cost_only:
        work = tile.data("_ring_work").reshape(r.shape + (n * chunk,))
        work[..., :size] = tile.data(buffer).reshape(r.shape + (size,))
    for s in range(2 * (n - 1)):
        reduce = s < n - 1
        # chunk a core sends this step, and the chunk it receives (one ring place behind)
        send_chunk = (my_place - s) % n if reduce else (my_place + 1 - (s - n + 1)) % n
        recv_chunk = (send_chunk - 1) % n
        if not tile.cost_only:
            tile.data("_ring_msg")[...] = tile.data("_ring_work")[rows, cols, send_chunk]
        tile.send(step, "_ring_msg", stream=True)
        if not tile.cost_only:
            tile.data("_ring_msg")[...] = tile.data("_ring_work")[rows, cols, recv_chunk]
        await tile.recv(step, "_ring_msg", op=op if reduce else "store", stream=True)
        if not tile.cost_only:
            tile.data("_ring_work")[rows, cols, recv_chunk] = tile.data("_ring_msg")
        if s in (n - 2, 2 * n - 3):
            tile.mark(".reduce-scatter" if reduce else ".allgather")
    if not tile.cost_only:
        tile.data(buffer)[...] = tile.data("_ring_work").reshape(r.shape + (n * chunk,))[..., :size].reshape(r.shape + buf.block)
    tile.free("_ring_work")
    tile.free("_ring_msg")


@protocol(routes=allreduce_routes)
async def allreduce(tile, *, buffer: str, axis: str, op: str = "add", algo: str = "ktree", K: int = 2,
                    group_num: int | None = None, root: int | None = None, broadcast: bool = True) -> None:
    """Allreduce ``buffer`` along ``axis`` with ``op`` using ``algo`` (ktree, chain, pipeline, ring)."""
    await run_allreduce(tile, buffer=buffer, axis=axis, op=op, algo=algo, K=K, group_num=group_num, root=root, broadcast=broadcast)


def _chain_routes(mesh: Mesh, *, buffer: str, axis: str, op: str = "add", root: int | None = None, broadcast: bool = True) -> list[Route]:
    return allreduce_routes(mesh, axis=axis, op=op, algo="chain", root=root, broadcast=broadcast)


@protocol(routes=_chain_routes)
async def chain_allreduce(tile, *, buffer: str, axis: str, op: str = "add", root: int | None = None, broadcast: bool = True) -> None:
    """Reduce ``buffer`` with ``op`` along ``axis`` to ``root`` (default: the middle core), then multicast."""
    await run_allreduce(tile, buffer=buffer, axis=axis, op=op, algo="chain", root=root, broadcast=broadcast)
