"""A collective as data: the transfer steps it runs on one buffer, and the fused executor for them.

A ``Program`` lists ``Step``s; in each, the cores send the step's transfers, then receive
them (a core fed by several combines them in the order given). The schedule is a pure
function of the mesh, so a protocol builds its program once (cached) and hands it to
``Tile.exchange``, which runs it either

- step by step (the ``step`` executor, the specification): one ``send`` and ``recv`` per
  step, messages between tiles as they happen; or
- fused (the ``fused`` executor), when every flow of the program starts and ends on the
  tile: all steps in one compiled call over the tile's cores, the data combined in the
  same order and the clocks advanced by the same rules (``timing``), so buffers, clocks
  and critical-path records come out bit-identical; only no messages are built.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from .timing import arrive, send_flows, settle
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
    """The steps of one collective; ``key`` names it in every process (same mesh, same arguments)."""

    key: str
    steps: tuple[Step, ...]

    @property
    def routes(self) -> frozenset[str]:
        return frozenset(t.route for s in self.steps for t in s.transfers)


@dataclass(frozen=True)
class Fused:
    """A program's flows on one tile, as flat arrays for the compiled loop.

    Part p (one transfer) holds flows ``part_ptr[p]:part_ptr[p + 1]``: ``src`` and ``dst``
    are flat core indices in the tile, in the transfer's flow order.
    """

    src: np.ndarray
    dst: np.ndarray
    load: np.ndarray
    hops: np.ndarray
    relays: np.ndarray
    part_ptr: np.ndarray
    step_ptr: np.ndarray  # step s sends and receives parts step_parts[step_ptr[s]:step_ptr[s + 1]]
    step_parts: np.ndarray
    step_op: np.ndarray
    step_stream: np.ndarray
    flows: int  # core messages one run sends (all inside the tile)

    @classmethod
    def build(cls, program: Program, tile) -> "Fused | None":
        """Flatten ``program`` for ``tile``; None if any flow starts or ends on another tile."""
        index, w, y0, x0 = tile.index, tile.rect.shape[1], tile.rect.y0, tile.rect.x0
        parts: dict[int, int] = {}
        src, dst, load, hops, relays, ptr, step_parts, step_ptr = [], [], [], [], [], [0], [], [0]
        for step in program.steps:
            for t in step.transfers:
                if id(t) not in parts:
                    view = t.view(tile.tiling, index)
                    if set(view.outgoing) - {index} or set(view.incoming) - {index}:
                        return None
                    f = view.outgoing[index].flows if index in view.outgoing else np.zeros(0, dtype=np.int64)
                    parts[id(t)] = len(parts)
                    src.append((t.src_y[f] - y0) * w + t.src_x[f] - x0)
                    dst.append((t.dst_y[f] - y0) * w + t.dst_x[f] - x0)
                    load.append(t.load[f])
                    hops.append(t.hops[f])
                    relays.append(t.relays[f])
                    ptr.append(ptr[-1] + len(f))
                step_parts.append(parts[id(t)])
            step_ptr.append(len(step_parts))
        sizes = np.diff(ptr)
        cat = lambda a: np.concatenate(a).astype(np.int64) if a else np.zeros(0, dtype=np.int64)  # noqa: E731
        return cls(
            cat(src), cat(dst), cat(load), cat(hops), cat(relays), np.array(ptr, dtype=np.int64),
            np.array(step_ptr, dtype=np.int64), np.array(step_parts, dtype=np.int64),
            np.array([OP_CODES[s.op] for s in program.steps], dtype=np.int64),
            np.array([s.stream for s in program.steps], dtype=np.bool_),
            int(sizes[step_parts].sum()) if step_parts else 0,
        )

    def run(self, tile, data: np.ndarray | None, size_cycles: float, combine: float) -> None:
        """Run every step on ``tile``'s clocks and on ``data`` (``[cores, elements]``, or None cost-only)."""
        dev, a = tile.device, tile.acc
        n = len(self.src)
        has_data = data is not None
        if not has_data:
            data = np.zeros((0, 0), dtype=np.float32)
        msg = np.empty((n if has_data else 0, data.shape[1]), dtype=data.dtype)
        _run_steps(*tile.flat_clocks(), *a, data, msg, has_data, self.src, self.dst, self.load, self.hops, self.relays,
                   self.part_ptr, self.step_ptr, self.step_parts, self.step_op, self.step_stream,
                   size_cycles, dev.alpha, dev.beta, combine, dev.call_overhead,
                   np.empty(n), np.empty(n), np.empty(n, dtype=np.int64), np.empty(n))


@njit(cache=True)
def _run_steps(clock, fwd_head, relaying, sent, stages, compute, acc_end, acc_start, acc_combine, acc_stages, acc_compute,
               data, msg, has_data, src, dst, load, hops, relays, part_ptr, step_ptr, step_parts, step_op, step_stream,
               size_cycles, alpha, beta, combine, call_overhead, head, tail, msg_stages, msg_compute):
    for s in range(step_ptr.size - 1):
        stream, op = step_stream[s], step_op[s]
        for k in range(step_ptr[s], step_ptr[s + 1]):  # sends: sources read before any receive of the step
            a, b = part_ptr[step_parts[k]], part_ptr[step_parts[k] + 1]
            send_flows(clock, fwd_head, relaying, sent, stages, compute, src[a:b], load[a:b], hops[a:b], relays[a:b],
                       size_cycles, alpha, beta, stream, head[a:b], tail[a:b], msg_stages[a:b], msg_compute[a:b])
            if has_data:
                for j in range(a, b):
                    for e in range(msg.shape[1]):
                        msg[j, e] = data[src[j], e]
        cost = 0.0 if op == 0 else combine
        for k in range(step_ptr[s], step_ptr[s + 1]):  # receives, combined in the order of the transfers
            a, b = part_ptr[step_parts[k]], part_ptr[step_parts[k] + 1]
            if has_data:
                for j in range(a, b):
                    d = dst[j]
                    for e in range(msg.shape[1]):
                        if op == 0:
                            data[d, e] = msg[j, e]
                        elif op == 1:
                            data[d, e] = data[d, e] + msg[j, e]
                        else:
                            data[d, e] = np.maximum(data[d, e], msg[j, e])
            arrive(clock, stages, compute, dst[a:b], head[a:b], tail[a:b], msg_stages[a:b], msg_compute[a:b], cost, beta,
                   stream, acc_end, acc_start, acc_combine, acc_stages, acc_compute)
        for k in range(step_ptr[s], step_ptr[s + 1]):
            a, b = part_ptr[step_parts[k]], part_ptr[step_parts[k] + 1]
            settle(clock, fwd_head, relaying, sent, stages, compute, dst[a:b], beta, call_overhead, stream,
                   acc_end, acc_start, acc_combine, acc_stages, acc_compute)
