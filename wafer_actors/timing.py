"""The fabric's timing rules: when a message's bytes reach a core and when the core goes on.

Virtual time (cycles). A message leaves its source with a head time (the core's clock,
or for a streaming relay the cycle its first element was ready) and a duration
``load x bytes / link_width``; it reaches the destination ``hops x alpha + relays x beta``
later. A plain receive waits for the tail. A streaming receive (a software relay that
combines and forwards element by element) starts ``beta`` after the head arrives, so a
chain of k relays costs ``k x (alpha + beta)`` plus one duration, not k durations. Sends
never advance the sender's clock, so communication overlaps later compute; but like MPI's
``Sendrecv`` a core's next receive completes only once its own earlier sends have landed
(its send buffer is free again), which is what makes a long wrap-around link slow a ring.

Critical path. Each core also records what lies on the path that set its clock: the
software relay stages and the compute cycles. Whenever a message, rather than the core's
own clock, decides when the core can go on, the core takes the message's record.

These are the only copy of the rules. Both executors call them: the step executor once
per transfer part, the fused one once per flow inside one compiled loop over a whole
collective. The functions are compiled (numba, no fast-math), so each runs the same float
operations in the same order wherever it is called from: that is what keeps the two
executors' clocks bit-identical. Every per-core array is a flat view of the tile's
``[h, w]`` array; ``fi`` holds flat core indices.

Cycles on a grid. Every cost the rules add (``Costs``: the device's latencies and
overheads, a block's duration, a combine, a compute charge) is rounded to a multiple of
``GRID`` (2^-16 cycle). Sums and maxima of such values below 2^36 cycles (a minute of
device time: ``program.EXACT``) are exact in float64, so a schedule whose inputs are all shifted
by a constant comes out exactly shifted by that constant: the fused executor times one
line of a collective for all lines whose state differs only by such a shift
(``program``). The rounding moves a prediction by far less than a cycle; the grid is fine
enough that a calibration's difference steps (a thousandth of a parameter) see slopes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .compiled import compiled

GRID = 2.0**-16  # cycles: every cost is a multiple of this


def on_grid(cycles):
    """``cycles`` (a number or an array) rounded to the nearest multiple of ``GRID`` (ties to even, as ``np.round``)."""
    if isinstance(cycles, (int, float)):
        return round(cycles / GRID) * GRID
    return np.round(np.asarray(cycles, dtype=float) / GRID) * GRID


@dataclass(frozen=True)
class Costs:
    """A device's cost constants on the grid, as the timing rules charge them."""

    alpha: float
    beta: float
    call_overhead: float
    map_overhead: float
    task_overhead: float
    link_bytes_per_cycle: float

    @classmethod
    def of(cls, device) -> "Costs":
        grid = {k: on_grid(float(getattr(device, k))) for k in ("alpha", "beta", "call_overhead", "map_overhead",
                                                                 "task_overhead")}
        return cls(**grid, link_bytes_per_cycle=device.link_bytes_per_cycle)

    def duration(self, nbytes: float) -> float:
        """Cycles a block of ``nbytes`` occupies one link."""
        return on_grid(float(nbytes) / self.link_bytes_per_cycle)

    def compute(self, fmacs, rate: float, calls=1, maps=0):
        """Cycles of one task: ``fmacs`` at ``rate`` FMACs per cycle, issued as ``calls`` vector instructions from
        ``maps`` loops over a DSD."""
        fmacs = fmacs if isinstance(fmacs, (int, float)) else np.asarray(fmacs, dtype=float)
        return on_grid(fmacs / rate + calls * self.call_overhead + maps * self.map_overhead + self.task_overhead)

    def combine(self, elements: int, rate: float) -> float:
        """Cycles to combine (add or max) a block of ``elements`` into another."""
        return on_grid(float(elements) / rate)


@njit(inline="always")
def departure(own, fwd_head, relaying, stream):
    """(start, own) of a flow leaving a core whose clock is ``own``: the cycle its first element leaves (a relay that
    took a stream forwards it from its ``fwd_head``) and the core's clock, before which its last element cannot
    leave. Every flow a core sends in one step leaves alike; only its path and load tell its arrival (``arrival``).

    These rules come in scalar forms (a core's values in, its new values out): the loops over cores read and write
    the arrays, which keeps numba from counting references to them once per core (several times slower)."""
    return (fwd_head if stream and relaying else own), own


@njit(inline="always")
def arrival(start, own, load, hops, relays, size_cycles, alpha, beta):
    """(head, tail) at its destination of a flow that left at ``(start, own)`` (``departure``)."""
    dur = size_cycles * load
    tail = max(start + dur, own)
    latency = hops * alpha + relays * beta
    return start + latency, tail + latency


@njit(inline="always")
def sends(sent, tail):
    """(relaying, sent) of a core that sent a flow landing at ``tail``: it no longer relays a stream, and its send
    buffer (busy until ``sent`` before) is busy until then."""
    return False, max(sent, tail)


@compiled
def send_flows(clock, fwd_head, relaying, sent, stages, compute, fi, load, hops, relays,
               size_cycles, alpha, beta, stream, head_out, tail_out, stages_out, compute_out):
    """Start one flow per entry of ``fi`` (its source core); write each flow's arrival head, tail and record.

    ``size_cycles`` is the block's bytes over the link width; a flow takes ``load`` times that.
    With ``stream``, a source that took a stream in its last receive forwards it from its
    ``fwd_head`` instead of its clock.
    """
    for j in range(fi.size):  # every flow reads its source's state before any flow changes it (multicasts)
        c = fi[j]
        start, own = departure(clock[c], fwd_head[c], relaying[c], stream)
        head_out[j], tail_out[j] = arrival(start, own, load[j], hops[j], relays[j], size_cycles, alpha, beta)
        stages_out[j] = stages[c]
        compute_out[j] = compute[c]
    for j in range(fi.size):
        c = fi[j]
        relaying[c], sent[c] = sends(sent[c], tail_out[j])


@njit(inline="always")
def _input_ends(c0, head, tail, combine, beta, stream):
    """(end, start, waited) of one input at a core whose clock was ``c0`` (see ``arrive``)."""
    if stream:
        start = max(c0, head) + beta
        return max(start + max(tail - head, combine), tail + beta), start, head > c0
    return max(c0, tail), -np.inf, tail > c0  # plain receives forward nothing


@njit(inline="always")
def gathers(c0, stages, compute, head, tail, msg_stages, msg_compute, combine, beta, stream, acc_end, acc_start,
            acc_combine, acc_stages, acc_compute):
    """The step's accumulators of a core (clock ``c0``, path record ``stages``, ``compute``) after one more input:
    (end, start, combine, stages, compute) from those before it (see ``arrive``)."""
    end, start, waited = _input_ends(c0, head, tail, combine, beta, stream)
    if end > acc_end:
        acc_stages = msg_stages if waited else stages
        acc_compute = msg_compute if waited else compute
    return max(acc_end, end), max(acc_start, start), acc_combine + combine, acc_stages, acc_compute


@njit(inline="always")
def goes_on(c0, sent, end, comb, path_stages, path_compute, beta, call_overhead, stream):
    """(clock, stages, compute) of a core whose clock was ``c0`` going on after its inputs (the last ending at
    ``end``) and its own earlier sends (the last landing at ``sent``)."""
    end = max(end, sent)
    if stream:
        return max(end, c0 + beta + comb), path_stages + 1, path_compute
    extra = comb + call_overhead if comb > 0 else 0.0
    return max(end, c0) + extra, path_stages, path_compute + extra


@njit(inline="always")
def forwards(fwd_head, start, stream):
    """(relaying, fwd_head) of a core after a receive: it relays a stream (forwarding from ``start``) if the receive
    streamed."""
    return stream, (start if stream else fwd_head)


@compiled
def arrive(clock, stages, compute, fi, head, tail, msg_stages, msg_compute, combine, beta, stream,
           acc_end, acc_start, acc_combine, acc_stages, acc_compute):
    """Take one input per entry of ``fi`` (its destination core) into the step's accumulators.

    For an input with head ``h`` and tail ``t`` at a core whose clock was ``c0``: a
    streaming receive starts ``s = max(c0, h) + beta`` and ends ``max(s + max(t - h, E),
    t + beta)`` (E = ``combine``, cycles to combine one block); a plain receive ends
    ``max(c0, t)``. Of several inputs to one core the one that ends last (the first of them
    on ties) is on the critical path: its record is kept. Clocks do not move until ``settle``.
    """
    for j in range(fi.size):
        c = fi[j]
        acc_end[c], acc_start[c], acc_combine[c], acc_stages[c], acc_compute[c] = gathers(
            clock[c], stages[c], compute[c], head[j], tail[j], msg_stages[j], msg_compute[j], combine, beta, stream,
            acc_end[c], acc_start[c], acc_combine[c], acc_stages[c], acc_compute[c])


@compiled
def settle(clock, fwd_head, relaying, sent, stages, compute, fi, beta, call_overhead, stream,
           acc_end, acc_start, acc_combine, acc_stages, acc_compute):
    """Apply a receive step to the cores in ``fi`` (a core fed by several inputs may repeat).

    A core goes on after its last input ends and its own earlier sends have landed, and not
    before it has combined every input. The accumulators are left empty for the next step.
    """
    for j in range(fi.size):
        c = fi[j]
        if acc_end[c] != -np.inf:  # (else listed again: already settled)
            clock[c], stages[c], compute[c], relaying[c], fwd_head[c] = settles(
                clock[c], sent[c], fwd_head[c], acc_end[c], acc_start[c], acc_combine[c], acc_stages[c], acc_compute[c],
                beta, call_overhead, stream)
            acc_end[c], acc_start[c], acc_combine[c] = -np.inf, -np.inf, 0.0


@njit(inline="always")
def settles(c0, sent, fwd_head, acc_end, acc_start, acc_combine, acc_stages, acc_compute, beta, call_overhead, stream):
    """(clock, stages, compute, relaying, fwd_head) of a core (clock ``c0``, last send landing at ``sent``) going on
    after the inputs its accumulators gathered (``settle``)."""
    clock, stages, compute = goes_on(c0, sent, acc_end, acc_combine, acc_stages, acc_compute, beta, call_overhead, stream)
    relaying, fwd_head = forwards(fwd_head, acc_start, stream)
    return clock, stages, compute, relaying, fwd_head


@compiled
def receive_one(clock, fwd_head, relaying, sent, stages, compute, fi, head, tail, msg_stages, msg_compute, combine,
                beta, call_overhead, stream):
    """``arrive`` then ``settle`` for a step in which every core of ``fi`` takes exactly one input (``takes``)."""
    for j in range(fi.size):
        c = fi[j]
        clock[c], start, stages[c], compute[c] = takes(clock[c], sent[c], stages[c], compute[c], head[j], tail[j],
                                                       msg_stages[j], msg_compute[j], combine, beta, call_overhead,
                                                       stream)
        relaying[c], fwd_head[c] = forwards(fwd_head[c], start, stream)


@njit(inline="always")
def takes(c0, sent, stages, compute, head, tail, msg_stages, msg_compute, combine, beta, call_overhead, stream):
    """(clock, start, stages, compute) of a core (clock ``c0``, last send landing at ``sent``, path record
    ``stages`` and ``compute``) after it takes its only input (see ``arrive``)."""
    end, start, waited = _input_ends(c0, head, tail, combine, beta, stream)
    clock, stages, compute = goes_on(c0, sent, end, combine, msg_stages if waited else stages,
                                     msg_compute if waited else compute, beta, call_overhead, stream)
    return clock, start, stages, compute


@compiled(parallel=True)
def send_flows_split(clock, fwd_head, relaying, sent, stages, compute, fi, load, hops, relays,
                     size_cycles, alpha, beta, stream, head_out, tail_out, stages_out, compute_out, chunks):
    """``send_flows`` in ``chunks`` on parallel threads, for flows whose sources are all distinct (no core's state is shared)."""
    for k in prange(chunks):
        a, b = k * fi.size // chunks, (k + 1) * fi.size // chunks
        send_flows(clock, fwd_head, relaying, sent, stages, compute, fi[a:b], load[a:b], hops[a:b], relays[a:b],
                   size_cycles, alpha, beta, stream, head_out[a:b], tail_out[a:b], stages_out[a:b], compute_out[a:b])


@compiled(parallel=True)
def receive_one_split(clock, fwd_head, relaying, sent, stages, compute, fi, head, tail, msg_stages, msg_compute, combine,
                      beta, call_overhead, stream, chunks):
    """``receive_one`` in ``chunks`` on parallel threads (its destinations are distinct by definition)."""
    for k in prange(chunks):
        a, b = k * fi.size // chunks, (k + 1) * fi.size // chunks
        receive_one(clock, fwd_head, relaying, sent, stages, compute, fi[a:b], head[a:b], tail[a:b], msg_stages[a:b],
                    msg_compute[a:b], combine, beta, call_overhead, stream)
