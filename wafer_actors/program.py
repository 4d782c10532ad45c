"""A collective as data: the transfer steps it runs on one buffer, and the fused executor for them.

A ``Program`` lists ``Step``s; in each, the cores send the step's transfers, then receive
them (a core fed by several combines them in the order given). The schedule is a pure
function of the mesh, so a protocol builds its program once (cached) and hands it to
``Tile.exchange``, which runs it either

- step by step (the ``step`` executor, the specification): one ``send`` and ``recv`` per
  step, messages between tiles as they happen; or
- fused (the ``fused`` executor): the steps run in compiled loops over the tile's cores,
  the data combined in the same order and the clocks advanced by the same rules
  (``timing``), so buffers, clocks and critical-path records come out bit-identical. A
  program whose flows stay inside the tile runs in one call, with no messages; one that
  crosses tile edges sends each neighbour one message per stretch of steps it can run
  alone (about one per edge per phase) instead of one per step.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import cached_property

import numba
import numpy as np
from numba import njit, prange

from .compiled import compiled
from .timing import (
    arrival,
    arrive,
    departure,
    forwards,
    gathers,
    receive_one,
    send_flows,
    sends,
    settle,
    settles,
    takes,
)
from .transfer import Transfer, contend

OP_CODES = {"store": 0, "add": 1, "max": 2}
EXACT = 2.0**36  # times below this are multiples of timing.GRID whose sums are exact (float64 has 53 bits)


@dataclass(frozen=True)
class Step:
    """Send ``transfers``, then receive them with ``op`` (``stream``: relays combine and forward as data arrives)."""

    transfers: tuple[Transfer, ...]
    op: str = "store"
    stream: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "transfers", contend(self.transfers))  # sent together: they share the links


@dataclass(frozen=True, eq=False)
class Program:
    """The steps of one collective; ``key`` names it in every process (same mesh, same arguments).

    ``phases``: the collective's phases (a chain phase, a multicast), each one task a core
    switches to (``DeviceSpec.task_overhead``).
    """

    key: str
    steps: tuple[Step, ...]
    phases: int = 0

    @cached_property
    def routes(self) -> frozenset[str]:
        return frozenset(t.route for s in self.steps for t in s.transfers)


@dataclass(frozen=True)
class Lines:
    """A program whose every part holds the same flows on each of the tile's lines (rows or columns).

    Lanes are runs of the tile's lines (``bounds``, cut at multiples of 8 so that two threads do not
    share a cache line of the per-core arrays). Within a part, flows are ordered by lane,
    then pattern flow, then line: pattern flow ``ptr[p] + i`` on line l of the lane starting
    at line b is flow ``part_ptr[p] + b * n + i * (lane's lines) + l - b`` (n pattern flows),
    and its core is ``member * member_stride + l * line_stride`` (member -1: the other tile's
    side). The compiled loop walks the lines of each pattern flow with no per-flow index arrays.

    ``lead``: per pattern flow of a part between two tiles, the part's first pattern flow from the same source
    (each source's block crosses once, in its lead flow's row of the messages' blocks; ``Box``); its own
    index in a part inside the tile.
    """

    line_stride: int
    member_stride: int
    members: int  # cores of the tile on each line
    bounds: np.ndarray  # [lane + 1]: first line of each lane
    ptr: np.ndarray  # [part + 1]: the part's pattern flows
    src: np.ndarray  # per pattern flow: member of the source along the line (-1: on another tile)
    dst: np.ndarray
    load: np.ndarray
    hops: np.ndarray
    relays: np.ndarray
    lead: np.ndarray

    def flows(self, part_ptr: np.ndarray, p: int, q: int) -> np.ndarray:
        """The flow of pattern flow ``q`` (of part ``p``) on each line."""
        ln = np.arange(int(self.bounds[-1]))
        lane = np.searchsorted(self.bounds, ln, side="right") - 1
        l0, l1 = self.bounds[lane], self.bounds[lane + 1]
        n = self.ptr[p + 1] - self.ptr[p]
        return part_ptr[p] + l0 * n + (q - self.ptr[p]) * (l1 - l0) + ln - l0


@dataclass(frozen=True)
class Segment:
    """What the line classes of one stretch of half-steps (run between two waits) need to know.

    A line's state is its cores' timing state and the flows from other tiles it takes in
    the stretch; ``launches`` / ``streams``: the members that send (their ``sent`` moves) /
    take a stream (their ``fwd_head`` moves) in it; ``taken``: per line, the flows from
    other tiles the stretch takes (``[flows, line]``); ``given``: the flows it sends that
    are read after it (to other tiles, or received in the next stretch).
    """

    launches: np.ndarray
    streams: np.ndarray
    taken: np.ndarray
    given: np.ndarray


def _lane_bounds(lines: int, lanes: int) -> np.ndarray:
    """First line of each of ``lanes`` runs of lines, cut at multiples of 8 where the lines allow."""
    cuts = [min(lines, round(i * lines / lanes / 8) * 8) for i in range(1, lanes)]
    return np.array([0, *cuts, lines], dtype=np.int64)


def _pattern(ln: np.ndarray, bounds: np.ndarray, *columns: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """The flow order of ``Lines`` and each column per pattern flow, if every line holds the same flows (same
    count, equal columns in the same order); None otherwise."""
    lines, n = int(bounds[-1]), len(ln)
    if n == 0 or n % lines:
        return None
    k, each = n // lines, np.arange(lines)
    if (ln.reshape(k, lines) == each).all():  # pattern flow i of every line, then i + 1 (lines are columns)
        grid = lambda c: c.reshape(k, lines)  # noqa: E731  [pattern flow, line], no copy
    elif (ln.reshape(lines, k) == each[:, None]).all():  # each line's flows together (lines are rows)
        grid = lambda c: c.reshape(lines, k).T  # noqa: E731
    else:
        counts = np.bincount(ln, minlength=lines)
        if counts.min() != counts.max():
            return None
        by_line = np.argsort(ln, kind="stable").reshape(lines, -1)  # each line's flows in the transfer's order
        grid = lambda c: c[by_line.T]  # noqa: E731
    pats = []
    for col in columns:
        g = grid(col)
        if (g != g[:, :1]).any():
            return None
        pats.append(g[:, 0])
    flows = grid(np.arange(n))
    order = np.concatenate([flows[:, a:b].ravel() for a, b in itertools.pairwise(bounds)])
    return order, pats


@dataclass(frozen=True)
class Box:
    """The flows of the parts between this tile and one other, in the order messages carry them.

    ``wire``: each flow's index in ``Fused``'s arrays; ``cum[i]``: flows in parts before part i;
    ``first``: per distinct source of each part, the position of its first flow (a message carries
    one block and one departure per distinct source); ``ucum[i]``: distinct sources in parts before part i;
    ``inverse``: per flow, its distinct source (numbered over the whole box); ``load``, ``hops``,
    ``relays``: per flow, its path (the receiver computes each flow's arrival from them); ``carries``: per flow,
    whether the loops read its block from its own row of ``Fused``'s blocks (a line program reads each source's
    block from its lead flow's row: ``Lines.lead``).
    """

    wire: np.ndarray
    cum: np.ndarray
    first: np.ndarray
    ucum: np.ndarray
    inverse: np.ndarray
    load: np.ndarray
    hops: np.ndarray
    relays: np.ndarray
    carries: np.ndarray


@dataclass(frozen=True)
class Fused:
    """A program's flows on one tile, as flat arrays for the compiled loop.

    A part is one transfer's flows between this tile and one tile (itself included): part p
    holds flows ``part_ptr[p]:part_ptr[p + 1]``, ``src`` and ``dst`` flat core indices in
    this tile (-1 on the side that is another tile's). Where every flow stays on its line
    (row or column: an allreduce), a part's flows are cut into lanes of whole lines (each
    lane keeps the transfer's order); lanes share no core, so they run on parallel threads
    with the same result. Where moreover every part repeats the same flows on each line
    (``lines``), the flows are kept as one pattern per part (no per-flow arrays): one line
    of each class of lines alike up to a shift of every time is timed (``_line_classes``)
    and every line's data moves. Messages carry a part's flows in the transfer's order
    (``inbox``, ``outbox``: where each is held here); what a flow carries from its source (its
    block, its departure, the record on the source's critical path) travels once per distinct
    source of each part (a multicast's once; both sides know which flow takes which), and the
    receiver computes each flow's arrival from its departure and its path (``timing.arrival``).
    Step s sends the parts ``send_parts[send_ptr[s]:send_ptr[s + 1]]`` and receives
    ``recv_parts[...]``, in the order ``Tile.send`` and ``Tile.recv`` take them. Parts to and from other tiles travel
    in batches: a tile runs its steps until one needs a part that has not arrived (or
    needs parts while the tile owes a neighbour some), sends each neighbour what it owes
    it in one message, and waits.
    """

    src: np.ndarray
    dst: np.ndarray
    load: np.ndarray
    hops: np.ndarray
    relays: np.ndarray
    part_ptr: np.ndarray
    lane_ptr: np.ndarray  # [part, lane + 1]: the part's flows of each lane (a run of lines; lanes run in parallel)
    peer: np.ndarray  # per part: the other tile (this tile's index for a local part)
    send_ptr: np.ndarray
    send_parts: np.ndarray
    recv_ptr: np.ndarray
    recv_parts: np.ndarray
    step_op: np.ndarray
    step_stream: np.ndarray
    step_single: np.ndarray  # every receiving core of the step takes one input
    step_direct: np.ndarray  # no core of the step both sends and receives: local blocks are read in place
    waits: tuple[int, ...]  # steps that receive a part from another tile
    needs: dict  # wait step -> ((tile, parts of its inbox the step needs received), ...)
    inbox: dict  # tile -> Box of the parts it sends here, in program order
    outbox: dict  # tile -> (upto, Box) of the parts sent there; upto[s] parts in the send phases < s
    local_flows: int
    remote_flows: int
    lines: Lines | None  # set where every part repeats on every line: the faster loop runs
    scratch: dict = field(default_factory=dict, repr=False)  # per-flow messages by (dtype, width), timing, classes: reused
    segments: dict = field(default_factory=dict, repr=False)  # (first, last) half-step -> Segment (line programs)

    @classmethod
    def build(cls, program: Program, tile) -> "Fused":
        """Flatten ``program`` for ``tile``."""
        index, (h, w), y0, x0 = tile.index, tile.rect.shape, tile.rect.y0, tile.rect.x0
        transfers = [t for step in program.steps for t in step.transfers]
        if all(np.array_equal(t.src_x, t.dst_x) for t in transfers):
            line, lines, first, along = (lambda t: t.dst_x), w, x0, "y"  # noqa: E731  flows stay in their column
        elif all(np.array_equal(t.src_y, t.dst_y) for t in transfers):
            line, lines, first, along = (lambda t: t.dst_y), h, y0, "x"  # noqa: E731
        else:
            line, lines, first, along = None, 1, 0, None  # one lane
        lanes = min(numba.get_num_threads(), lines)
        bounds = _lane_bounds(lines, lanes)
        raw: list[tuple[Transfer, str, int, np.ndarray]] = []  # per part: transfer, way, peer, its flows
        sources: list[np.ndarray] = []  # per part: each flow's distinct source, in the transfer's order
        parts: dict[tuple[int, str, int], int] = {}  # (transfer, way, peer) -> part
        send_parts, send_ptr, recv_parts, recv_ptr, waits = [], [0], [], [0], []
        from_peer: dict[int, list[int]] = {}
        flows = {True: 0, False: 0}

        def part(t: Transfer, way: str, other: int, pt) -> int:
            key = (id(t), "local" if other == index else way, other)
            if key not in parts:
                parts[key] = len(raw)
                raw.append((t, "local" if other == index else way, other, pt.flows))
                sources.append(pt.inverse)
            return parts[key]

        for s, step in enumerate(program.steps):
            for t in step.transfers:
                view = t.view(tile.tiling, index)
                for dest, pt in view.outgoing.items():
                    send_parts.append(part(t, "out", dest, pt))
                    flows[dest == index] += len(pt.flows)
                for src, pt in view.incoming.items():
                    p = part(t, "in", src, pt)
                    recv_parts.append(p)
                    if src != index:
                        from_peer.setdefault(src, []).append(p)
                        if not waits or waits[-1] != s:
                            waits.append(s)
            send_ptr.append(len(send_parts))
            recv_ptr.append(len(recv_parts))
        cat = lambda a: np.concatenate(a).astype(np.int64) if a else np.zeros(0, dtype=np.int64)  # noqa: E731
        ints = lambda a: np.array(a, dtype=np.int64)  # noqa: E731
        here = lambda f, y, x: (y[f] - y0) * w + x[f] - x0  # noqa: E731  flat core index on this tile
        member = (lambda f, y, x: y[f] - y0) if along == "y" else (lambda f, y, x: x[f] - x0)  # noqa: E731  position on its line
        cols: dict[str, list] = {k: [] for k in ("src", "dst", "load", "hops", "relays")}
        pats: dict[str, list] = {k: [] for k in (*cols, "lead")}
        orders = []
        for t, way, other, f in raw:  # the pattern order where every part repeats on every line
            ln = None if line is None else line(t)[f] - first
            found = None if ln is None else _pattern(
                ln, bounds, *(member(f, t.src_y, t.src_x) if way != "in" else np.full(len(f), -1),
                             member(f, t.dst_y, t.dst_x) if way != "out" else np.full(len(f), -1),
                             t.load[f], t.hops[f], t.relays[f], (t.src_y if along == "y" else t.src_x)[f]))
            if found is None:
                break
            orders.append(found[0])
            *found_cols, source = found[1]
            for k, v in zip(cols, found_cols):
                pats[k].append(v)
            _, first_at, of = np.unique(source, return_index=True, return_inverse=True)
            pats["lead"].append(np.arange(len(source)) if other == index else first_at[of])
        by_line = line is not None and len(orders) == len(raw) > 0
        lane_ptr, wire, ptr, peer = [], [], [0], []
        for i, (t, way, other, f) in enumerate(raw):
            if by_line:
                order = orders[i]
            else:
                lane = np.zeros(len(f), dtype=np.int64) if line is None else (line(t)[f] - first) * lanes // lines
                order = np.argsort(lane, kind="stable")
                lane_ptr.append(ptr[-1] + np.searchsorted(lane[order], np.arange(lanes + 1)))
            wire.append(ptr[-1] + np.argsort(order) if other != index else None)  # only messages need it
            if not by_line:  # a line program keeps its pattern instead
                f = f[order]
                none = np.full(len(f), -1)
                cols["src"].append(here(f, t.src_y, t.src_x) if way != "in" else none)
                cols["dst"].append(here(f, t.dst_y, t.dst_x) if way != "out" else none)
                for k in ("load", "hops", "relays"):
                    cols[k].append(getattr(t, k)[f])
            ptr.append(ptr[-1] + len(f))
            peer.append(other)
        if by_line:
            line_stride, member_stride = (1, w) if along == "y" else (w, 1)
            sizes = [len(a) for a in pats["src"]]
            pats["lead"] = [lead + start for lead, start in zip(pats["lead"], np.cumsum([0] + sizes))]
            shape = Lines(line_stride, member_stride, h * w // lines, bounds, np.cumsum([0] + sizes),
                          *(cat(pats[k]) for k in pats))
            lane_ptr = np.zeros((len(raw), 2), dtype=np.int64)  # unused: lanes are runs of lines
            cores, cols = shape.members, {"src": pats["src"], "dst": pats["dst"]}  # each line alike: check one
        else:
            shape, cores = None, h * w
            lane_ptr = np.array(lane_ptr, dtype=np.int64).reshape(len(raw), lanes + 1)
        carries = np.ones(ptr[-1], dtype=np.bool_)  # (a part inside the tile leads each of its flows)
        for p in (p for p in range(len(raw)) if by_line and peer[p] != index):
            for q in range(shape.ptr[p], shape.ptr[p + 1]):
                if shape.lead[q] != q:
                    carries[shape.flows(ints(ptr), p, q)] = False

        def box(ps: list[int]) -> Box:
            cum = np.cumsum([0] + [ptr[p + 1] - ptr[p] for p in ps])
            firsts = [np.unique(sources[p], return_index=True)[1] for p in ps]  # per distinct source, its first flow
            ucum = np.cumsum([0] + [len(f) for f in firsts])
            first = cat([cum[i] + f for i, f in enumerate(firsts)])
            path = [cat([getattr(raw[p][0], k)[raw[p][3]] for p in ps]) for k in ("load", "hops", "relays")]
            flows = cat([wire[p] for p in ps])
            assert carries[flows[first]].all()  # a batch carries each source's block from its lead flow
            return Box(flows, cum, first, ucum, cat([ucum[i] + sources[p] for i, p in enumerate(ps)]), *path,
                       carries[flows])

        inbox = {src: box(ps) for src, ps in from_peer.items()}
        needs = {}
        for s in waits:
            need: dict[int, int] = {}
            for p in recv_parts[recv_ptr[s] : recv_ptr[s + 1]]:
                if peer[p] != index:
                    need[peer[p]] = max(need.get(peer[p], 0), from_peer[peer[p]].index(p) + 1)
            needs[s] = tuple(need.items())
        outbox = {}
        for dest in {peer[p] for p in send_parts} - {index}:
            ps = [p for p in send_parts if peer[p] == dest]
            upto = np.array([sum(peer[p] == dest for p in send_parts[: send_ptr[s]]) for s in range(len(program.steps) + 1)])
            outbox[dest] = (upto, box(ps))
        single, direct = [], []
        for s in range(len(program.steps)):
            into = cat([cols["dst"][p] for p in recv_parts[recv_ptr[s] : recv_ptr[s + 1]]])
            out = cat([cols["src"][p] for p in send_parts[send_ptr[s] : send_ptr[s + 1]]])
            into = into[into >= 0]
            single.append(len(into) == 0 or np.bincount(into, minlength=cores).max() == 1)
            sends = np.zeros(cores, dtype=bool)
            sends[out[out >= 0]] = True
            direct.append(not sends[into].any())
        return cls(
            *(cat(cols.get(k, [])) for k in ("src", "dst", "load", "hops", "relays")), ints(ptr), lane_ptr, ints(peer),
            ints(send_ptr), ints(send_parts), ints(recv_ptr), ints(recv_parts),
            ints([OP_CODES[s.op] for s in program.steps]), np.array([s.stream for s in program.steps], dtype=np.bool_),
            np.array(single, dtype=np.bool_), np.array(direct, dtype=np.bool_), tuple(waits), needs, inbox, outbox,
            flows[True], flows[False], shape,
        )

    def segment(self, first: int, last: int, me: int) -> Segment:
        """The ``Segment`` of half-steps ``first .. last - 1`` (a line program) on tile ``me``."""
        seg = self.segments.get((first, last))
        if seg is not None:
            return seg
        ln = self.lines
        launches, streams = np.zeros(ln.members, dtype=np.bool_), np.zeros(ln.members, dtype=np.bool_)
        taken, given = [], []
        for h in range(first, last):
            s = h // 2
            sends = h % 2 == 0
            ptr, parts = (self.send_ptr, self.send_parts) if sends else (self.recv_ptr, self.recv_parts)
            for p in parts[ptr[s] : ptr[s + 1]]:
                for q in range(ln.ptr[p], ln.ptr[p + 1]):
                    member = ln.src[q] if sends else ln.dst[q]
                    if member >= 0 and sends:
                        launches[member] = True
                    elif member >= 0 and self.step_stream[s]:
                        streams[member] = True
                    if self.peer[p] != me and (ln.lead[q] == q or not sends):  # a batch carries a source once
                        (given if sends else taken).append(ln.flows(self.part_ptr, p, q))
                    elif sends and 2 * s + 1 >= last:  # received in a later stretch, whose classes may differ
                        given.append(ln.flows(self.part_ptr, p, q))
        lines = int(ln.bounds[-1])
        stack = lambda a: np.array(a, dtype=np.int64).reshape(len(a), lines)  # noqa: E731
        seg = self.segments[first, last] = Segment(launches, streams, stack(taken), stack(given))
        return seg

    def timing(self) -> tuple[np.ndarray, ...]:
        """Per flow: arrival head and tail, and the record it carries (stages, compute); reused by every run."""
        if "timing" not in self.scratch:
            n = int(self.part_ptr[-1])
            self.scratch["timing"] = (np.empty(n), np.empty(n), np.empty(n, dtype=np.int64), np.empty(n))
        return self.scratch["timing"]

    def departures(self) -> tuple[np.ndarray, np.ndarray]:
        """Per flow: its ``timing.departure`` (start, own), written where it leaves the tile: what a batch carries of
        its source, from which the receiver computes each flow's arrival."""
        if "departures" not in self.scratch:
            n = int(self.part_ptr[-1])
            self.scratch["departures"] = (np.empty(n), np.empty(n))
        return self.scratch["departures"]

    def _classes(self) -> tuple[np.ndarray, ...]:
        """The line classes a run keeps from one stretch to the next (``_stretch``): per line its class line's
        index (``reps``, the first n entries; n in ``held``, 0 for none), ``rep_of`` and ``shift``, and the members
        whose ``sent`` / ``fwd_head`` the stretches since the classes were sorted moved."""
        if "classes" not in self.scratch:
            lines, members = int(self.lines.bounds[-1]), self.lines.members
            self.scratch["classes"] = (np.empty(lines, dtype=np.int64), np.empty(lines, dtype=np.int64), np.empty(lines),
                                       np.zeros(1, dtype=np.int64), np.zeros(members, dtype=np.bool_),
                                       np.zeros(members, dtype=np.bool_))
        return self.scratch["classes"]

    def _blocks(self, data: np.ndarray) -> np.ndarray:
        """Per flow, the block it carries, of ``data``'s (none where ``_NO_DATA``); reused by every run."""
        key = (data.dtype.str, data.shape[1])
        if key not in self.scratch:
            self.scratch[key] = np.empty((0 if data is _NO_DATA else int(self.part_ptr[-1]), data.shape[1]),
                                         dtype=data.dtype)
        return self.scratch[key]

    def forget(self) -> None:
        """Drop the arrays runs were given (kept with their arguments for the next run given the same)."""
        self.scratch.pop("runs", None)

    def _run_args(self, tile, data: np.ndarray, out: np.ndarray, msg: np.ndarray, size_cycles: float,
                  combine: float) -> tuple:
        """The arguments of ``_run_phases``, or those of ``_stretch`` but the stretch's own, for a run on ``tile``
        from ``data`` into ``out`` (both ``_NO_DATA`` cost-only) through ``msg``."""
        has_data, costs = data is not _NO_DATA, tile.costs
        if self.lines is None:
            return (*tile.flat_clocks(), *tile.acc, data, out, msg, has_data, self.src, self.dst, self.load, self.hops,
                    self.relays, self.part_ptr, self.lane_ptr, self.peer, tile.index, self.send_ptr, self.send_parts,
                    self.recv_ptr, self.recv_parts, self.step_op, self.step_stream, self.step_single, self.step_direct,
                    size_cycles, costs.alpha, costs.beta, combine, costs.call_overhead, *self.timing(),
                    *self.departures())
        ln = self.lines
        block = max(1, DATA_BLOCK_BYTES // max(1, ln.members * data.shape[1] * data.itemsize))
        return (*tile.flat_clocks(), *tile.acc, ln.src, ln.dst, ln.load, ln.hops, ln.relays, ln.lead, self.part_ptr, ln.ptr,
                ln.bounds, ln.line_stride, ln.member_stride, self.send_ptr, self.send_parts, self.recv_ptr,
                self.recv_parts, self.step_op, self.step_stream, self.step_single, size_cycles, costs.alpha, costs.beta,
                combine, costs.call_overhead, *self.timing(), *self.departures(), int(ln.bounds[-1]), ln.members,
                *self._classes(), data, out, msg, has_data, self.peer, tile.index, self.step_direct, block)

    async def run(self, tile, tag: str, data: np.ndarray | None, out: np.ndarray | None, size_cycles: float,
                  combine: float) -> None:
        """Run every step on ``tile``'s clocks: send blocks of ``data``, receive into ``out`` (``[cores, elements]``,
        the same array or one of its shape; both None cost-only).

        ``tag`` names this run of the program in the messages between tiles.
        """
        has_data = data is not None
        if not has_data:
            data = out = _NO_DATA
        runs = self.scratch.setdefault("runs", {})  # a run's arguments, per arrays and costs (the entry holds the
        key = (id(data), id(out), size_cycles, combine)  # arrays, so their ids stay theirs)
        kept = runs.get(key)
        if kept is None:
            msg = self._blocks(data)
            kept = runs[key] = (data, out, msg, self._run_args(tile, data, out, msg, size_cycles, combine))
        msg, state = kept[2], kept[3]
        head, tail, stages, compute = self.timing()
        start, own = self.departures()
        costs = tile.costs
        if self.lines is None:
            def kernel(first: int, last: int, end: bool = False) -> None:
                _run_phases(*state, first, last)
        else:
            self._classes()[3][0] = 0  # none kept from an aborted run

            def kernel(first: int, last: int, end: bool = False) -> None:
                seg = self.segment(first, last, tile.index)
                _stretch(*state, seg.launches, seg.streams, seg.taken, seg.given, first, last, end)
        steps = len(self.step_op)
        if not self.waits and not self.outbox:  # every flow stays on the tile: one call, no messages
            kernel(0, 2 * steps, True)
            return
        sent = 0  # send phases run so far: their parts to other tiles are owed until the next flush
        flushed = dict.fromkeys(self.outbox, 0)  # tile -> parts of its outbox sent
        taken = dict.fromkeys(self.inbox, 0)  # tile -> parts of its inbox received
        batches: dict[tuple[str, int], int] = {}  # (way, tile) -> batches posted to it / taken from it

        def count(way: str, other: int) -> int:
            k = batches[way, other] = batches.get((way, other), -1) + 1
            return k

        def flush() -> None:
            for dest, (upto, b) in self.outbox.items():
                i0, i1 = flushed[dest], upto[sent]
                if i1 > i0:
                    out = _batch_out(b.wire, b.first, b.ucum[i0], b.ucum[i1], start, own, stages, compute, msg, has_data)
                    tile.post_batch(dest, f"{tag}:{count('out', dest)}", out[0] if has_data else None, *out[1:])
                    flushed[dest] = i1

        async def take(src: int) -> None:
            m = await tile.take_batch(f"{tag}:{count('in', src)}", src)
            b, i = self.inbox[src], taken[src]
            i1 = int(np.searchsorted(b.ucum, b.ucum[i] + len(m.stages)))  # the parts it carries (none is empty)
            _batch_in(b.wire, b.inverse, b.load, b.hops, b.relays, b.carries, b.cum[i], b.cum[i1], b.ucum[i], size_cycles,
                      costs.alpha, costs.beta, head, tail, stages, compute, msg, m.head, m.tail, m.stages, m.compute,
                      m.data if has_data else msg, has_data)
            taken[src] = i1

        def arrived(src: int) -> bool:
            return tile.has_batch(f"{tag}:{batches.get(('in', src), -1) + 1}", src)

        done = 0  # half-steps run: 2 s is step s's sends, 2 s + 1 its receives
        for s in self.waits:
            for src, need in self.needs[s]:  # what has arrived of this step's parts lands now (no step reads it yet)
                while taken[src] < need and arrived(src):
                    await take(src)
            if all(taken[src] >= need for src, need in self.needs[s]) and all(
                    upto[s + 1] == flushed[dest] for dest, (upto, _) in self.outbox.items()):
                continue  # nothing to wait for or to send here: the stretch runs on through this step
            kernel(done, 2 * s + 1)  # everything up to this step's receives
            sent = s + 1
            for src, need in self.needs[s]:
                while taken[src] < need:
                    flush()
                    await take(src)
            done = 2 * s + 1
        kernel(done, 2 * steps, True)
        sent = steps
        flush()


@compiled
def _batch_out(wire, first, u0, u1, start, own, stages, compute, msg, has_data):
    """What a batch carries of a box's distinct sources ``u0:u1``: (blocks, start, own, stages, compute), one of each
    per distinct source (its block, departure and record; no blocks without data)."""
    u = u1 - u0
    blocks = np.empty((u if has_data else 0, msg.shape[1]), dtype=msg.dtype)
    start_out, own_out, stages_out, compute_out = np.empty(u), np.empty(u), np.empty(u, dtype=stages.dtype), np.empty(u)
    for k in range(u):
        j = wire[first[u0 + k]]
        start_out[k], own_out[k], stages_out[k], compute_out[k] = start[j], own[j], stages[j], compute[j]
        if has_data:
            blocks[k] = msg[j]
    return blocks, start_out, own_out, stages_out, compute_out


@compiled
def _batch_in(wire, inverse, load, hops, relays, carries, f0, f1, u0, size_cycles, alpha, beta, head, tail, stages,
              compute, msg, m_start, m_own, m_stages, m_compute, m_data, has_data):
    """Place a batch's flows, positions ``f0:f1`` of their box (distinct sources from ``u0``): each flow's arrival,
    from its source's departure and its own path, its source's record, and its source's block where it ``carries``
    it."""
    for k in range(f0, f1):
        j, o = wire[k], inverse[k] - u0
        head[j], tail[j] = arrival(m_start[o], m_own[o], load[k], hops[k], relays[k], size_cycles, alpha, beta)
        stages[j], compute[j] = m_stages[o], m_compute[o]
        if has_data and carries[k]:
            for e in range(msg.shape[1]):  # element by element: a row assignment costs more than these few elements
                msg[j, e] = m_data[o, e]


@compiled(parallel=True)
def _run_phases(clock, fwd_head, relaying, sent, stages, compute, acc_end, acc_start, acc_combine, acc_stages, acc_compute,
                data, out, msg, has_data, src, dst, load, hops, relays, part_ptr, lane_ptr, peer, me, send_ptr, send_parts,
                recv_ptr, recv_parts, step_op, step_stream, step_single, step_direct, size_cycles, alpha, beta, combine,
                call_overhead, head, tail, msg_stages, msg_compute, dep_start, dep_own, first, last):
    """Half-steps ``first .. last - 1`` on every lane: half-step 2 s sends step s's parts, 2 s + 1 receives them."""
    for lane in prange(lane_ptr.shape[1] - 1):
        for h in range(first, last):
            s = h // 2
            stream, op, direct = step_stream[s], step_op[s], step_direct[s]
            if h % 2 == 0:  # sends: sources read before any receive of the step
                for k in range(send_ptr[s], send_ptr[s + 1]):
                    p = send_parts[k]
                    a, b = lane_ptr[p, lane], lane_ptr[p, lane + 1]
                    if peer[p] != me:  # leaves the tile: its batch carries the departure
                        for j in range(a, b):
                            c = src[j]
                            dep_start[j], dep_own[j] = departure(clock[c], fwd_head[c], relaying[c], stream)
                    send_flows(clock, fwd_head, relaying, sent, stages, compute, src[a:b], load[a:b], hops[a:b],
                               relays[a:b], size_cycles, alpha, beta, stream, head[a:b], tail[a:b], msg_stages[a:b],
                               msg_compute[a:b])
                    if has_data and not (direct and peer[p] == me):  # a block that must not change before it lands
                        for j in range(a, b):
                            for e in range(msg.shape[1]):
                                msg[j, e] = data[src[j], e]
                continue
            cost = 0.0 if op == 0 else combine
            for k in range(recv_ptr[s], recv_ptr[s + 1]):  # receives, combined in the order of the transfers
                p = recv_parts[k]
                a, b = lane_ptr[p, lane], lane_ptr[p, lane + 1]
                if has_data:
                    inplace = direct and peer[p] == me
                    for j in range(a, b):
                        d = dst[j]
                        row = data[src[j]] if inplace else msg[j]
                        if op == 0:
                            for e in range(row.size):
                                out[d, e] = row[e]
                        elif op == 1:
                            for e in range(row.size):
                                out[d, e] = out[d, e] + row[e]
                        else:
                            for e in range(row.size):
                                out[d, e] = np.maximum(out[d, e], row[e])
                if step_single[s]:
                    receive_one(clock, fwd_head, relaying, sent, stages, compute, dst[a:b], head[a:b], tail[a:b],
                                msg_stages[a:b], msg_compute[a:b], cost, beta, call_overhead, stream)
                else:
                    arrive(clock, stages, compute, dst[a:b], head[a:b], tail[a:b], msg_stages[a:b], msg_compute[a:b],
                           cost, beta, stream, acc_end, acc_start, acc_combine, acc_stages, acc_compute)
            if not step_single[s]:
                for k in range(recv_ptr[s], recv_ptr[s + 1]):
                    a, b = lane_ptr[recv_parts[k], lane], lane_ptr[recv_parts[k], lane + 1]
                    settle(clock, fwd_head, relaying, sent, stages, compute, dst[a:b], beta, call_overhead, stream,
                           acc_end, acc_start, acc_combine, acc_stages, acc_compute)


@compiled
def _stretch(clock, fwd_head, relaying, sent, stages, compute, acc_end, acc_start, acc_combine, acc_stages, acc_compute,
             pat_src, pat_dst, pat_load, pat_hops, pat_relays, pat_lead, part_ptr, pat_ptr, bounds, line_stride,
             member_stride, send_ptr, send_parts, recv_ptr, recv_parts, step_op, step_stream, step_single, size_cycles,
             alpha, beta, combine, call_overhead, head, tail, msg_stages, msg_compute, dep_start, dep_own, lines, members,
             reps, rep_of, shift, held, launches, streams, data, out, msg, has_data, peer, me, step_direct, block,
             seg_launches, seg_streams, taken, given, first, last, end):
    """Half-steps ``first .. last - 1`` of a line program: every line's data moves (``_move_lines``, with
    ``has_data``); one line of each class of lines alike up to a shift of every time is timed (``_time_lines``), the
    others take its outcome, shifted (``_expand``).

    The classes (n of them in ``held[0]``, 0 for none) are kept from one stretch of a run to the next while the
    flows the next one takes from other tiles are, line by line, its class line's shifted (then each line's state
    stays its class line's shifted too): the other lines' cores take their outcome once, after the run's last stretch
    (``end``, which drops the classes), instead of after every stretch; the flows a stretch sends on (``given``) at
    once, as messages carry them.
    ``launches`` / ``streams`` gather the stretches' ``seg_launches`` / ``seg_streams`` since the classes were sorted.
    Returns 1 where the classes of the stretch before held, -1 where they did not (the lines are sorted anew), 0
    where there were none to check."""
    n, kept = held[0], 0
    if 0 < n < lines:
        kept = 1 if _classes_hold(clock, fwd_head, relaying, sent, stages, compute, head, tail, msg_stages, msg_compute,
                                  lines, members, line_stride, member_stride, taken, reps[:n], rep_of, shift) else -1
        if kept < 0:
            _expand(clock, fwd_head, relaying, sent, stages, compute, head, tail, msg_stages, msg_compute, dep_start,
                    dep_own, lines, members, line_stride, member_stride, launches, streams, reps[:n], rep_of, shift,
                    given[:0], True)
            n = 0
    if n == 0:
        n = _line_classes(clock, fwd_head, relaying, sent, stages, compute, head, tail, msg_stages, msg_compute, lines,
                          members, line_stride, member_stride, taken, reps, rep_of, shift)
        launches[:] = False
        streams[:] = False
        held[0] = n
    _time_lines(clock, fwd_head, relaying, sent, stages, compute, acc_end, acc_start, acc_combine, acc_stages,
                acc_compute, pat_src, pat_dst, pat_load, pat_hops, pat_relays, part_ptr, pat_ptr, bounds, line_stride,
                member_stride, send_ptr, send_parts, recv_ptr, recv_parts, step_op, step_stream, step_single,
                size_cycles, alpha, beta, combine, call_overhead, head, tail, msg_stages, msg_compute, dep_start, dep_own,
                reps[:n], first, last)
    if n < lines:
        for m in range(members):
            launches[m] |= seg_launches[m]
            streams[m] |= seg_streams[m]
        _expand(clock, fwd_head, relaying, sent, stages, compute, head, tail, msg_stages, msg_compute, dep_start,
                dep_own, lines, members, line_stride, member_stride, launches, streams, reps[:n], rep_of, shift, given,
                end)
    if end:
        held[0] = 0
    if has_data:
        _move_lines(data, out, msg, pat_src, pat_dst, pat_lead, part_ptr, pat_ptr, bounds, line_stride, member_stride,
                    peer, me, send_ptr, send_parts, recv_ptr, recv_parts, step_op, step_direct, block, first, last)
    return kept


@compiled  # serial: one line per class (one or two in decode) is too little to share; parallel took 5 s more to compile
def _time_lines(clock, fwd_head, relaying, sent, stages, compute, acc_end, acc_start, acc_combine, acc_stages, acc_compute,
                pat_src, pat_dst, pat_load, pat_hops, pat_relays, part_ptr, pat_ptr, bounds, line_stride, member_stride,
                send_ptr, send_parts, recv_ptr, recv_parts, step_op, step_stream, step_single, size_cycles, alpha, beta,
                combine, call_overhead, head, tail, msg_stages, msg_compute, dep_start, dep_own, reps, first, last):
    """The timing of ``_run_phases`` for a program whose parts repeat on every line (``Lines``), on the lines
    ``reps`` (ascending) only: the same rules on the same flows, each part's pattern flows walked line by line; a
    lane is a run of lines (``_move_lines`` runs lanes on parallel threads)."""
    for lane in range(bounds.size - 1):
        l0, l1 = bounds[lane], bounds[lane + 1]
        r0 = _first_at_least(reps, l0)
        r1 = _first_at_least(reps, l1)
        for h in range(first, last):
            s = h // 2
            stream = step_stream[s]
            if h % 2 == 0:  # sends: sources read before any receive of the step
                for k in range(send_ptr[s], send_ptr[s + 1]):
                    p = send_parts[k]
                    for q in range(pat_ptr[p], pat_ptr[p + 1]):
                        j0 = part_ptr[p] + l0 * (pat_ptr[p + 1] - pat_ptr[p]) + (q - pat_ptr[p]) * (l1 - l0) - l0
                        c0 = pat_src[q] * member_stride
                        load, hops, relays = pat_load[q], pat_hops[q], pat_relays[q]
                        for r in range(r0, r1):
                            ln = reps[r]
                            c, j = c0 + ln * line_stride, j0 + ln
                            dep_start[j], dep_own[j] = departure(clock[c], fwd_head[c], relaying[c], stream)
                            head[j], tail[j] = arrival(dep_start[j], dep_own[j], load, hops, relays, size_cycles, alpha,
                                                       beta)
                            msg_stages[j] = stages[c]
                            msg_compute[j] = compute[c]
                    for q in range(pat_ptr[p], pat_ptr[p + 1]):
                        j0 = part_ptr[p] + l0 * (pat_ptr[p + 1] - pat_ptr[p]) + (q - pat_ptr[p]) * (l1 - l0) - l0
                        c0 = pat_src[q] * member_stride
                        for r in range(r0, r1):
                            ln = reps[r]
                            c = c0 + ln * line_stride
                            relaying[c], sent[c] = sends(sent[c], tail[j0 + ln])
                continue
            cost = 0.0 if step_op[s] == 0 else combine
            single = step_single[s]
            for k in range(recv_ptr[s], recv_ptr[s + 1]):  # receives, in the order of the transfers
                p = recv_parts[k]
                for q in range(pat_ptr[p], pat_ptr[p + 1]):
                    j0 = part_ptr[p] + l0 * (pat_ptr[p + 1] - pat_ptr[p]) + (q - pat_ptr[p]) * (l1 - l0) - l0
                    d0 = pat_dst[q] * member_stride
                    for r in range(r0, r1):
                        ln = reps[r]
                        d, j = d0 + ln * line_stride, j0 + ln
                        if single:
                            clock[d], start, stages[d], compute[d] = takes(clock[d], sent[d], stages[d], compute[d], head[j],
                                                                           tail[j], msg_stages[j], msg_compute[j], cost,
                                                                           beta, call_overhead, stream)
                            relaying[d], fwd_head[d] = forwards(fwd_head[d], start, stream)
                        else:
                            acc_end[d], acc_start[d], acc_combine[d], acc_stages[d], acc_compute[d] = gathers(
                                clock[d], stages[d], compute[d], head[j], tail[j], msg_stages[j], msg_compute[j], cost,
                                beta, stream, acc_end[d], acc_start[d], acc_combine[d], acc_stages[d], acc_compute[d])
            if not single:
                for k in range(recv_ptr[s], recv_ptr[s + 1]):
                    p = recv_parts[k]
                    for q in range(pat_ptr[p], pat_ptr[p + 1]):
                        d0 = pat_dst[q] * member_stride
                        for r in range(r0, r1):
                            d = d0 + reps[r] * line_stride
                            if acc_end[d] != -np.inf:  # (else listed again: already settled)
                                clock[d], stages[d], compute[d], relaying[d], fwd_head[d] = settles(
                                    clock[d], sent[d], fwd_head[d], acc_end[d], acc_start[d], acc_combine[d],
                                    acc_stages[d], acc_compute[d], beta, call_overhead, stream)
                                acc_end[d], acc_start[d], acc_combine[d] = -np.inf, -np.inf, 0.0


@njit(inline="always")
def _first_at_least(sorted_, v):
    """``np.searchsorted(sorted_, v)`` by a scan (numba's searchsorted costs a second and a half to compile)."""
    i = 0
    while i < sorted_.size and sorted_[i] < v:
        i += 1
    return i


_NO_DATA = np.zeros((0, 0), dtype=np.float32)  # the blocks of a cost-only run
DATA_BLOCK_BYTES = 196_608  # data of the lines run through every step at once (smaller blocks lost more to loop set-up)


@compiled(parallel=True)
def _move_lines(data, out, msg, pat_src, pat_dst, pat_lead, part_ptr, pat_ptr, bounds, line_stride, member_stride, peer,
                me, send_ptr, send_parts, recv_ptr, recv_parts, step_op, step_direct, block, first, last):
    """The data of ``_run_phases`` for a ``Lines`` program: every line's blocks sent (copied where they might change
    before they land; to another tile, once per source: ``Lines.lead``) and combined in the order of the transfers.
    Lines are independent, so each lane runs its lines in blocks of ``block`` that stay in the cache through all the
    half-steps."""
    row = data.shape[1]
    fd, fo, fm = data.reshape(-1), out.reshape(-1), msg.reshape(-1)
    for lane in prange(bounds.size - 1):
        l0, l1 = bounds[lane], bounds[lane + 1]
        for b0 in range(l0, l1, block):
            b1 = min(b0 + block, l1)
            for h in range(first, last):
                s = h // 2
                direct = step_direct[s]
                if h % 2 == 0:
                    for k in range(send_ptr[s], send_ptr[s + 1]):
                        p = send_parts[k]
                        if direct and peer[p] == me:  # read in place when it lands
                            continue
                        for q in range(pat_ptr[p], pat_ptr[p + 1]):
                            if pat_lead[q] != q:
                                continue
                            j0 = part_ptr[p] + l0 * (pat_ptr[p + 1] - pat_ptr[p]) + (q - pat_ptr[p]) * (l1 - l0) - l0
                            _move(fm, j0 + b0, 1, fd, pat_src[q] * member_stride + b0 * line_stride, line_stride,
                                  b1 - b0, row, 0)
                    continue
                op = step_op[s]
                for k in range(recv_ptr[s], recv_ptr[s + 1]):
                    p = recv_parts[k]
                    inplace = direct and peer[p] == me
                    for q in range(pat_ptr[p], pat_ptr[p + 1]):
                        ql = pat_lead[q]  # the flow whose row holds the block
                        j0 = part_ptr[p] + l0 * (pat_ptr[p + 1] - pat_ptr[p]) + (ql - pat_ptr[p]) * (l1 - l0) - l0
                        d0 = pat_dst[q] * member_stride + b0 * line_stride
                        if inplace:
                            _move(fo, d0, line_stride, fd, pat_src[q] * member_stride + b0 * line_stride, line_stride,
                                  b1 - b0, row, op)
                        else:
                            _move(fo, d0, line_stride, fm, j0 + b0, 1, b1 - b0, row, op)


@njit(inline="always")
def _move(fo, o0, o_step, fs, s0, s_step, n, row, op):
    """Rows ``out[o0 + i * o_step] (op)= src[s0 + i * s_step]`` for i < n of ``row`` elements each, ``fo`` and ``fs``
    the two arrays flat (op 0 store, 1 add, 2 max); rows that follow each other in both arrays run as one loop over
    their elements. Each loop runs over two slices, which the compiler vectorises (over index arithmetic on the
    whole arrays it does not)."""
    run = row
    if o_step == 1 and s_step == 1:  # one run of n rows
        n, run = 1, n * row
    for i in range(n):
        a, b = (o0 + i * o_step) * row, (s0 + i * s_step) * row
        o, s = fo[a : a + run], fs[b : b + run]
        if op == 0:
            for e in range(run):
                o[e] = s[e]
        elif op == 1:
            for e in range(run):
                o[e] = o[e] + s[e]
        else:
            for e in range(run):
                o[e] = np.maximum(o[e], s[e])


MAX_CLASSES = 16  # lines are compared with at most this many classes; the rest are timed on their own


@njit(inline="always")
def _alike(clock, sent, fwd_head, relaying, stages, compute, d, rc, rs, rf, rr, rst, rco):
    """Whether a core's state, its times less ``d``, is a class core's (``rc`` its clock, ``rs`` its sent or clock
    if later, ...) as far as the rules read it."""
    return ((clock - d == rc) & (stages == rst) & (compute == rco) & (relaying == rr) & (max(sent, clock) - d == rs)
            & ((not rr) | (fwd_head - d == rf)))


@compiled
def _line_classes(clock, fwd_head, relaying, sent, stages, compute, head, tail, msg_stages, msg_compute, lines, members,
                  line_stride, member_stride, taken, reps, rep_of, shift):
    """Sort the lines into classes whose timing state is the same up to a shift of every time (``timing``: on the
    grid such a shift is exact); return the count n and fill ``reps[:n]`` (one line per class, ascending),
    ``rep_of`` and ``shift`` (a line's times minus its class line's).

    Times are measured from the clock of a line's first core. Parts of the state that no rule reads compare as
    equal: ``fwd_head`` of a core that relays no stream, and ``sent`` where it lies below the core's clock (both
    maxima it enters are then decided by the clock). A line with a time outside the exact range is a class of its
    own. A line is a column (``line_stride`` 1, ``member_stride`` = lines) or a row (``line_stride`` = members,
    ``member_stride`` 1); the loops run in memory order.
    """
    off = np.empty(lines)
    for ln in range(lines):
        off[ln] = clock[ln * line_stride]
    d = np.empty(lines)
    ok = np.empty(lines, dtype=np.bool_)
    rep_of[:] = -1
    n = 0
    for r in range(lines):
        if rep_of[r] >= 0:
            continue
        reps[n], rep_of[r], shift[r] = r, r, 0.0
        n += 1
        exact = True
        for m in range(members):
            c = r * line_stride + m * member_stride
            exact &= _exact_core(clock[c], sent[c], fwd_head[c], relaying[c])
        for k in range(taken.shape[0]):
            exact &= abs(head[taken[k, r]]) < EXACT and abs(tail[taken[k, r]]) < EXACT
        if not exact or n > MAX_CLASSES:
            continue
        for ln in range(lines):  # the lines compared are checked exact as they are compared
            d[ln] = off[ln] - off[r]
            ok[ln] = ln > r and rep_of[ln] < 0
        if line_stride == 1:  # a member's cores on every line are contiguous: compare them with the class line's
            for m in range(members):
                b = m * lines
                cr = b + r
                rc, rs, rf = clock[cr], max(sent[cr], clock[cr]), fwd_head[cr]
                rr, rst, rco = relaying[cr], stages[cr], compute[cr]
                for ln in range(lines):
                    c = b + ln
                    ok[ln] &= _alike(clock[c], sent[c], fwd_head[c], relaying[c], stages[c], compute[c], d[ln], rc, rs,
                                     rf, rr, rst, rco) & _exact_core(clock[c], sent[c], fwd_head[c], relaying[c])
        else:  # each line's cores are contiguous
            rb = r * members
            e = rb + members
            rcl, rse, rfw, rre, rsta, rcom = clock[rb:e], sent[rb:e], fwd_head[rb:e], relaying[rb:e], stages[rb:e], compute[rb:e]
            for ln in range(r + 1, lines):
                b = ln * members
                e = b + members
                lcl, lse, lfw, lre, lsta, lcom = clock[b:e], sent[b:e], fwd_head[b:e], relaying[b:e], stages[b:e], compute[b:e]
                miss = 0
                for m in range(members):
                    miss += not (_alike(lcl[m], lse[m], lfw[m], lre[m], lsta[m], lcom[m], d[ln], rcl[m],
                                        max(rse[m], rcl[m]), rfw[m], rre[m], rsta[m], rcom[m])
                                 & _exact_core(lcl[m], lse[m], lfw[m], lre[m]))
                ok[ln] &= miss == 0
        for k in range(taken.shape[0]):
            jr = taken[k, r]
            for ln in range(lines):
                j = taken[k, ln]
                ok[ln] &= ((head[j] - d[ln] == head[jr]) & (tail[j] - d[ln] == tail[jr]) & (msg_stages[j] == msg_stages[jr])
                           & (msg_compute[j] == msg_compute[jr]) & (abs(head[j]) < EXACT) & (abs(tail[j]) < EXACT))
        for ln in range(r + 1, lines):
            if ok[ln]:
                rep_of[ln], shift[ln] = r, d[ln]
    return n


@compiled
def _classes_hold(clock, fwd_head, relaying, sent, stages, compute, head, tail, msg_stages, msg_compute, lines, members,
                  line_stride, member_stride, taken, reps, rep_of, shift):
    """Whether the classes of ``_line_classes`` still hold for a stretch taking the flows ``taken`` from other tiles:
    each line's are its class line's shifted, and every time of the class lines, shifted, and of those flows stays
    in the exact range."""
    most = 0.0
    for ln in range(lines):
        most = max(most, abs(shift[ln]))
    for r in reps:
        for m in range(members):
            c = r * line_stride + m * member_stride
            if not (abs(clock[c]) + most < EXACT and abs(sent[c]) + most < EXACT
                    and (abs(fwd_head[c]) + most < EXACT or not relaying[c])):
                return False
    for k in range(taken.shape[0]):
        for ln in range(lines):
            j, jr, d = taken[k, ln], taken[k, rep_of[ln]], shift[ln]
            if not (abs(head[j]) < EXACT and abs(tail[j]) < EXACT and head[j] - d == head[jr] and tail[j] - d == tail[jr]
                    and msg_stages[j] == msg_stages[jr] and msg_compute[j] == msg_compute[jr]):
                return False
    return True


@njit(inline="always")
def _exact_core(clock, sent, fwd_head, relaying):
    """Whether the times of a core that the rules read lie below ``EXACT`` (a NaN does not)."""
    return (abs(clock) < EXACT) & (abs(sent) < EXACT) & ((abs(fwd_head) < EXACT) | (not relaying))


@compiled
def _expand(clock, fwd_head, relaying, sent, stages, compute, head, tail, msg_stages, msg_compute, dep_start, dep_own,
            lines, members, line_stride, member_stride, launches, streams, reps, rep_of, shift, given, cores):
    """Give every line that was not timed its class line's outcome, shifted: the flows ``given`` and, with
    ``cores``, the timing state of its cores (``sent`` and ``fwd_head`` only where the stretches moved them:
    ``launches``, ``streams``). A class line takes its own outcome (shift 0), so every line can be written. Strides
    as in ``_line_classes``."""
    if cores and line_stride == 1 and len(reps) == 1:  # columns of one class: a member's cores on every line at once
        r = reps[0]
        for m in range(members):  # one loop per array over contiguous cores, which the compiler vectorises
            b, e = m * lines, (m + 1) * lines
            cr = b + r
            rc, rr, rst, rco, rs, rf = clock[cr], relaying[cr], stages[cr], compute[cr], sent[cr], fwd_head[cr]
            _shifted(clock[b:e], rc, shift)
            relaying[b:e], stages[b:e], compute[b:e] = rr, rst, rco
            if launches[m]:
                _shifted(sent[b:e], rs, shift)
            if streams[m]:
                _shifted(fwd_head[b:e], rf, shift)
    elif cores and line_stride == 1:  # columns: one class at a time
        for r in reps:
            for m in range(members):
                b = m * lines
                cr = b + r
                rc, rr, rst, rco, rs, rf = clock[cr], relaying[cr], stages[cr], compute[cr], sent[cr], fwd_head[cr]
                launch, stream = launches[m], streams[m]
                for ln in range(lines):
                    if rep_of[ln] == r:
                        c = b + ln
                        clock[c] = rc + shift[ln]
                        relaying[c], stages[c], compute[c] = rr, rst, rco
                        if launch:
                            sent[c] = rs + shift[ln]
                        if stream:
                            fwd_head[c] = rf + shift[ln]
    elif cores:  # rows: each line from its class line, one loop per array (a slice expression would allocate)
        for ln in range(lines):
            r, d = rep_of[ln], shift[ln]
            if r == ln:
                continue
            b, rb = ln * members, r * members
            e, re = b + members, rb + members
            _moved(clock[b:e], clock[rb:re], d, launches, True)
            _moved(sent[b:e], sent[rb:re], d, launches, False)
            _moved(fwd_head[b:e], fwd_head[rb:re], d, streams, False)
            _copied(relaying[b:e], relaying[rb:re])
            _copied(stages[b:e], stages[rb:re])
            _copied(compute[b:e], compute[rb:re])
    for k in range(given.shape[0]):
        for ln in range(lines):
            r, d = rep_of[ln], shift[ln]
            j, jr = given[k, ln], given[k, r]
            head[j], tail[j], msg_stages[j], msg_compute[j] = head[jr] + d, tail[jr] + d, msg_stages[jr], msg_compute[jr]
            dep_start[j], dep_own[j] = dep_start[jr] + d, dep_own[jr] + d


@njit(inline="always")
def _shifted(out, x, shift):
    """``out[i] = x + shift[i]``."""
    for i in range(out.size):
        out[i] = x + shift[i]


@njit(inline="always")
def _copied(out, x):
    """``out[i] = x[i]``."""
    for i in range(out.size):
        out[i] = x[i]


@njit(inline="always")
def _moved(out, x, d, where, every):
    """``out[i] = x[i] + d`` where ``every`` or ``where[i]``."""
    for i in range(out.size):
        out[i] = x[i] + d if every or where[i] else out[i]


SEND, LAND, CHARGE = 0, 1, 2  # the operations of ``run_steps``


@compiled
def run_steps(clock, fwd_head, relaying, sent, stages, compute, busy, src, dst, load, hops, relays, until, ptr, codes,
              which, amount, pair, steps, alpha, beta, call_overhead):
    """``steps`` repeats of one step's operations on transfers inside the tile (no multicast, plain stores):
    ``codes[i]`` SEND transfer ``which[i]`` (flows ``ptr[k]:ptr[k + 1]``), a block of ``amount[i]`` cycles, as
    ``Tile.start_local`` would, LAND what send ``pair[i]`` sent as ``land_local`` would, or CHARGE every core
    ``amount[i]`` cycles as ``Clocks.charge`` would (``busy`` too if it is not empty). Flow ``j`` moves in the first
    ``until[j]`` steps only (a send or land of it later is skipped). Every send comes before every land, and a
    transfer's flows have distinct sources and destinations. Returns False (nothing changed) where a time would
    leave the exact range.

    A step compares times only with times (clocks, sends' ends, arrivals) and copies or adds the path records
    (stages, compute cycles), and a core's step reads only its own state and that of the sources of the flows it
    lands (each at the end of the step before). So where a core and those sources all moved by one step of the
    same amounts (each time alike; on the 2^-16-cycle grid, below ``EXACT``, where sums are exact), the core's next
    step is that step again. Each step is therefore played only at the cores where that does not hold; the others
    keep the state of the step they last played and that step's amounts, and are read as that state plus the
    amounts for each step since. A ring whose cores start out of step falls into step one core a step (a front
    moving on from the slowest), so a step plays a few cores per ring instead of all. A core whose flows stop
    moving plays the step at which they stop."""
    n, nk, count = clock.size, ptr.size - 1, busy.size > 0
    flow = np.full((n, 2 * nk), -1, np.int64)  # the flow of each transfer a core sends, then the one it lands
    fl = np.empty((ptr[-1], 4), np.int64)  # each flow's source, load, hops and relays
    for t in range(nk):
        for j in range(ptr[t], ptr[t + 1]):
            flow[src[j], t], flow[dst[j], nk + t] = j, j
            fl[j, 0], fl[j, 1], fl[j, 2], fl[j, 3] = src[j], load[j], hops[j], relays[j]
    # each core's clock, send end, compute on its path and busy cycles after the step it last played, then that
    # step's amounts; its stages on its path, that step's amount, and the step
    st, ints = np.zeros((n, 8)), np.zeros((n, 3), np.int64)
    st[:, 0], st[:, 1], st[:, 2], ints[:, 0] = clock, sent, compute, stages
    if count:
        st[:, 3] = busy
    act, nxt, seen = np.arange(n), np.empty(n, np.int64), np.full(n, -1, np.int64)
    stops, stop = np.argsort(until, kind="mergesort"), 0  # the flows by the last step they move
    new, new_g = np.empty((n, 8)), np.empty((n, 2), np.int64)  # the played cores' states: after, before
    na, ok = n, True
    for s in range(1, steps + 1):  # (steps in which no core plays cost nothing)
        for a in range(na):
            c = act[a]
            k = s - 1 - ints[c, 2]
            cl, o0 = _ahead(st[c, 0], st[c, 4], k)
            se, o1 = _ahead(st[c, 1], st[c, 5], k)
            m, o2 = _ahead(st[c, 2], st[c, 6], k)
            bz, o3 = _ahead(st[c, 3], st[c, 7], k)
            g = ints[c, 0] + k * ints[c, 1]
            ok &= o0 and o1 and o2 and o3
            new[a, 4], new[a, 5], new[a, 6], new[a, 7], new_g[a, 1] = cl, se, m, bz, g
            for i in range(codes.size):
                t = which[i]
                if codes[i] == CHARGE:
                    cl, m, bz = cl + amount[i], m + amount[i], bz + amount[i]
                elif codes[i] == SEND:
                    j = flow[c, t]
                    if j >= 0 and s <= until[j]:  # relaying no stream, it departs at its clock (``departure``)
                        _, se = sends(se, arrival(cl, cl, fl[j, 1], fl[j, 2], fl[j, 3], amount[i], alpha, beta)[1])
                elif flow[c, nk + t] >= 0 and s <= until[flow[c, nk + t]]:
                    j = flow[c, nk + t]
                    p = fl[j, 0]  # the source's step up to its send of this flow (sends change no path record)
                    kp = s - 1 - ints[p, 2]
                    pc, o0 = _ahead(st[p, 0], st[p, 4], kp)
                    pm, o2 = _ahead(st[p, 2], st[p, 6], kp)
                    ok &= o0 and o2
                    for i2 in range(pair[i]):
                        if codes[i2] == CHARGE:
                            pc, pm = pc + amount[i2], pm + amount[i2]
                    head, tail = arrival(pc, pc, fl[j, 1], fl[j, 2], fl[j, 3], amount[pair[i]], alpha, beta)
                    cl, _, g, m = takes(cl, se, g, m, head, tail, ints[p, 0] + kp * ints[p, 1], pm, 0.0, beta,
                                        call_overhead, False)
            new[a, 0], new[a, 1], new[a, 2], new[a, 3], new_g[a, 0] = cl, se, m, bz, g
            ok &= _exact(cl) and _exact(se) and _exact(m) and _exact(bz)
        for a in range(na):
            c = act[a]
            for q in range(4):
                st[c, q], st[c, 4 + q] = new[a, q], new[a, q] - new[a, 4 + q]
            ints[c, 0], ints[c, 1], ints[c, 2] = new_g[a, 0], new_g[a, 0] - new_g[a, 1], s
        nb = 0  # the next step plays the cores whose flows stop moving, ...
        while stop < until.size and until[stops[stop]] <= s:
            j = stops[stop]
            stop += 1
            if until[j] == s and s < steps:
                for t in (src[j], dst[j]):
                    if seen[t] != s:
                        seen[t] = s
                        nxt[nb] = t
                        nb += 1
        for a in range(na):  # ... and those whose step or a source's step just changed, unless they still agree
            c = act[a]
            for e in range(-1, nk):
                j = flow[c, e] if e >= 0 else -1
                t = c if e < 0 else (dst[j] if j >= 0 else -1)
                if t >= 0 and seen[t] != s:
                    seen[t] = s
                    if not _steady(t, st, ints, flow, fl, nk, until, s + 1):
                        nxt[nb] = t
                        nb += 1
        act, nxt, na = nxt, act, nb
    for c in range(n):  # every core's state after the last step
        k = steps - ints[c, 2]
        for q in range(4):
            new[c, q], o = _ahead(st[c, q], st[c, 4 + q], k)
            ok &= o
        new_g[c, 0] = ints[c, 0] + k * ints[c, 1]
    if not ok:
        return False
    clock[:], sent[:], compute[:], stages[:] = new[:, 0], new[:, 1], new[:, 2], new_g[:, 0]
    if count:
        busy[:] = new[:, 3]
    for j in range(ptr[-1]):
        if until[j] > 0 and steps > 0:
            relaying[src[j]] = relaying[dst[j]] = False
    return True


@njit
def _ahead(x, d, k):
    """(``x`` plus ``k`` steps of ``d``, whether that is the exact sum of the steps: all on the grid, below ``EXACT``)."""
    if k == 0:
        return x, True
    y = x + k * d
    return y, _exact(x) and _exact(y) and _on_grid(d)


@njit
def _exact(x):
    return abs(x) < EXACT and _on_grid(x)


@njit
def _steady(c, st, ints, flow, fl, nk, until, s):
    """Core ``c``'s last step moved its clock and send end alike, and the sources of what it lands at step ``s``
    moved as it did."""
    if st[c, 4] != st[c, 5]:
        return False
    for t in range(nk):
        j = flow[c, nk + t]
        if j >= 0 and s <= until[j]:
            p = fl[j, 0]
            if st[p, 4] != st[c, 4] or st[p, 5] != st[c, 5] or st[p, 6] != st[c, 6] or st[p, 7] != st[c, 7]:
                return False
            if ints[p, 1] != ints[c, 1]:
                return False
    return True


@njit(inline="always")
def _on_grid(x):
    """``x`` is a multiple of 2^-16 (a cycle count the timing rules can produce and sum exactly)."""
    return x * 65536.0 == np.floor(x * 65536.0)
