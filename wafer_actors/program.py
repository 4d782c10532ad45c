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

from dataclasses import dataclass, field
from functools import cached_property

import numba
import numpy as np
from numba import njit, prange

from .timing import arrive, receive_one, send_flows, settle
from .transfer import Transfer

OP_CODES = {"store": 0, "add": 1, "max": 2}


@dataclass(frozen=True)
class Step:
    """Send ``transfers``, then receive them with ``op`` (``stream``: relays combine and forward as data arrives)."""

    transfers: tuple[Transfer, ...]
    op: str = "store"
    stream: bool = False


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
class Fused:
    """A program's flows on one tile, as flat arrays for the compiled loop.

    A part is one transfer's flows between this tile and one tile (itself included): part p
    holds flows ``part_ptr[p]:part_ptr[p + 1]``, ``src`` and ``dst`` flat core indices in
    this tile (-1 on the side that is another tile's). Where every flow stays on its line
    (row or column: an allreduce), a part's flows are cut into lanes of whole lines (each
    lane keeps the transfer's order); lanes share no core, so they run on parallel threads
    with the same result. Messages carry a part's flows in the transfer's order (``wire``).
    Step s sends the parts ``send_parts[send_ptr[s]:send_ptr[s + 1]]`` and receives
    ``recv_parts[...]``, in the order ``Tile.send`` and ``Tile.recv`` take them. Parts to and from other tiles travel
    in batches: a tile runs its steps until one needs a part it has not received, sends
    each neighbour what it owes it in one message, and waits.
    """

    src: np.ndarray
    dst: np.ndarray
    load: np.ndarray
    hops: np.ndarray
    relays: np.ndarray
    part_ptr: np.ndarray
    lane_ptr: np.ndarray  # [part, lane + 1]: the part's flows of each lane (a run of lines; lanes run in parallel)
    wire: np.ndarray  # per flow of a part, in the transfer's order (both ends agree on it): where it is held here
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
    inbox: dict  # tile -> (wire, cum): the flows of the parts it sends here in program order; cum[i] flows in parts < i
    outbox: dict  # tile -> (upto, wire, cum): the same for the parts sent there; upto[s] parts in the send phases < s
    local_flows: int
    remote_flows: int
    scratch: dict = field(default_factory=dict, repr=False)  # (dtype, width) -> per-flow arrays, reused by every run

    @classmethod
    def build(cls, program: Program, tile) -> "Fused":
        """Flatten ``program`` for ``tile``."""
        index, (h, w), y0, x0 = tile.index, tile.rect.shape, tile.rect.y0, tile.rect.x0
        transfers = [t for step in program.steps for t in step.transfers]
        if all(np.array_equal(t.src_x, t.dst_x) for t in transfers):
            line, lines, first = (lambda t: t.dst_x), w, x0  # noqa: E731  flows stay in their column
        elif all(np.array_equal(t.src_y, t.dst_y) for t in transfers):
            line, lines, first = (lambda t: t.dst_y), h, y0  # noqa: E731
        else:
            line, lines, first = None, 1, 0  # one lane
        lanes = min(numba.get_num_threads(), lines)
        lane_ptr: list[np.ndarray] = []
        wire: list[np.ndarray] = []
        parts: dict[tuple[int, str, int], int] = {}  # (transfer, way, peer) -> part
        cols: dict[str, list] = {k: [] for k in ("src", "dst", "load", "hops", "relays")}
        ptr, peer, send_parts, send_ptr, recv_parts, recv_ptr, waits = [0], [], [], [0], [], [0], []
        from_peer: dict[int, list[int]] = {}
        flows = {True: 0, False: 0}

        def part(t: Transfer, way: str, other: int, f: np.ndarray) -> int:
            key = (id(t), "local" if other == index else way, other)
            if key not in parts:
                parts[key] = len(parts)
                lane = np.zeros(len(f), dtype=np.int64) if line is None else (line(t)[f] - first) * lanes // lines
                order = np.argsort(lane, kind="stable")
                f = f[order]
                lane_ptr.append(ptr[-1] + np.searchsorted(lane[order], np.arange(lanes + 1)))
                wire.append(ptr[-1] + np.argsort(order))
                here = lambda y, x: (y[f] - y0) * w + x[f] - x0  # noqa: E731
                none = np.full(len(f), -1)
                cols["src"].append(here(t.src_y, t.src_x) if way == "out" or other == index else none)
                cols["dst"].append(here(t.dst_y, t.dst_x) if way == "in" or other == index else none)
                for k in ("load", "hops", "relays"):
                    cols[k].append(getattr(t, k)[f])
                ptr.append(ptr[-1] + len(f))
                peer.append(other)
            return parts[key]

        for s, step in enumerate(program.steps):
            for t in step.transfers:
                view = t.view(tile.tiling, index)
                for dest, pt in view.outgoing.items():
                    send_parts.append(part(t, "out", dest, pt.flows))
                    flows[dest == index] += len(pt.flows)
                for src, pt in view.incoming.items():
                    p = part(t, "in", src, pt.flows)
                    recv_parts.append(p)
                    if src != index:
                        from_peer.setdefault(src, []).append(p)
                        if not waits or waits[-1] != s:
                            waits.append(s)
            send_ptr.append(len(send_parts))
            recv_ptr.append(len(recv_parts))
        cat = lambda a: np.concatenate(a).astype(np.int64) if a else np.zeros(0, dtype=np.int64)  # noqa: E731
        ints = lambda a: np.array(a, dtype=np.int64)  # noqa: E731

        def box(ps: list[int]) -> tuple[np.ndarray, np.ndarray]:
            return cat([wire[p] for p in ps]), np.cumsum([0] + [ptr[p + 1] - ptr[p] for p in ps])

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
            outbox[dest] = (upto, *box(ps))
        single, direct = [], []
        for s in range(len(program.steps)):
            into = cat([cols["dst"][p] for p in recv_parts[recv_ptr[s] : recv_ptr[s + 1]]])
            out = cat([cols["src"][p] for p in send_parts[send_ptr[s] : send_ptr[s + 1]]])
            single.append(len(np.unique(into)) == len(into))
            direct.append(not np.isin(into, out[out >= 0]).any())
        return cls(
            *(cat(cols[k]) for k in ("src", "dst", "load", "hops", "relays")), ints(ptr),
            np.array(lane_ptr, dtype=np.int64).reshape(len(ptr) - 1, lanes + 1), cat(wire), ints(peer),
            ints(send_ptr), ints(send_parts), ints(recv_ptr), ints(recv_parts),
            ints([OP_CODES[s.op] for s in program.steps]), np.array([s.stream for s in program.steps], dtype=np.bool_),
            np.array(single, dtype=np.bool_), np.array(direct, dtype=np.bool_), tuple(waits), needs, inbox, outbox,
            flows[True], flows[False],
        )

    async def run(self, tile, tag: str, data: np.ndarray | None, out: np.ndarray | None, size_cycles: float,
                  combine: float) -> None:
        """Run every step on ``tile``'s clocks: send blocks of ``data``, receive into ``out`` (``[cores, elements]``,
        the same array or one of its shape; both None cost-only).

        ``tag`` names this run of the program in the messages between tiles.
        """
        dev = tile.device
        n = len(self.src)
        has_data = data is not None
        if not has_data:
            data = out = np.zeros((0, 0), dtype=np.float32)
        key = (data.dtype.str, data.shape[1])
        if key not in self.scratch:
            self.scratch[key] = (np.empty((n if has_data else 0, data.shape[1]), dtype=data.dtype), np.empty(n), np.empty(n),
                                 np.empty(n, dtype=np.int64), np.empty(n))
        msg, head, tail, stages, compute = self.scratch[key]
        state = (*tile.flat_clocks(), *tile.acc, data, out, msg, has_data, self.src, self.dst, self.load, self.hops, self.relays,
                 self.part_ptr, self.lane_ptr, self.peer, tile.index, self.send_ptr, self.send_parts, self.recv_ptr, self.recv_parts,
                 self.step_op, self.step_stream, self.step_single, self.step_direct, size_cycles, dev.alpha, dev.beta,
                 combine, dev.call_overhead, head, tail, stages, compute)
        steps = len(self.step_op)
        sent = 0  # send phases run so far: their parts to other tiles are owed until the next flush
        flushed = dict.fromkeys(self.outbox, 0)  # tile -> parts of its outbox sent
        taken = dict.fromkeys(self.inbox, 0)  # tile -> parts of its inbox received
        batches: dict[tuple[str, int], int] = {}  # (way, tile) -> batches posted to it / taken from it

        def count(way: str, other: int) -> int:
            k = batches[way, other] = batches.get((way, other), -1) + 1
            return k

        def flush() -> None:
            for dest, (upto, wire, cum) in self.outbox.items():
                i0, i1 = flushed[dest], upto[sent]
                if i1 > i0:
                    idx = wire[cum[i0] : cum[i1]]
                    tile.post_batch(dest, f"{tag}:{count('out', dest)}", msg[idx] if has_data else None, head[idx], tail[idx],
                                    stages[idx], compute[idx])
                    flushed[dest] = i1

        async def take(src: int) -> None:
            m = await tile.take_batch(f"{tag}:{count('in', src)}", src)
            wire, cum = self.inbox[src]
            a = cum[taken[src]]
            where = wire[a : a + len(m.head)]
            head[where], tail[where], stages[where], compute[where] = m.head, m.tail, m.stages, m.compute
            if has_data:
                msg[where] = m.data
            taken[src] = int(np.searchsorted(cum, a + len(m.head)))

        done = 0  # half-steps run: 2 s is step s's sends, 2 s + 1 its receives
        for s in self.waits:
            _run_phases(*state, done, 2 * s + 1)  # everything up to this step's receives
            sent = s + 1
            for src, need in self.needs[s]:
                while taken[src] < need:
                    flush()
                    await take(src)
            done = 2 * s + 1
        _run_phases(*state, done, 2 * steps)
        sent = steps
        flush()


@njit(cache=True, parallel=True)
def _run_phases(clock, fwd_head, relaying, sent, stages, compute, acc_end, acc_start, acc_combine, acc_stages, acc_compute,
                data, out, msg, has_data, src, dst, load, hops, relays, part_ptr, lane_ptr, peer, me, send_ptr, send_parts,
                recv_ptr, recv_parts, step_op, step_stream, step_single, step_direct, size_cycles, alpha, beta, combine,
                call_overhead, head, tail, msg_stages, msg_compute, first, last):
    """Half-steps ``first .. last - 1`` on every lane: half-step 2 s sends step s's parts, 2 s + 1 receives them."""
    for lane in prange(lane_ptr.shape[1] - 1):
        for h in range(first, last):
            s = h // 2
            stream, op, direct = step_stream[s], step_op[s], step_direct[s]
            if h % 2 == 0:  # sends: sources read before any receive of the step
                for k in range(send_ptr[s], send_ptr[s + 1]):
                    p = send_parts[k]
                    a, b = lane_ptr[p, lane], lane_ptr[p, lane + 1]
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
