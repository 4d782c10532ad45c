"""Timelines in Chrome's Trace Event Format (open in Perfetto or chrome://tracing).

Two processes: ``device (predicted)``, whose clock is the predicted device time, and
``host (emulator)``, the host's wall time of the same spans (where the emulator spends its
time). For a generation each region is a thread: a decode step is a span per region,
holding a span per layer, holding a span per operation (the ``tile.mark`` phases of the
protocols: norms, q/k/v with its allreduce, RoPE and the KV cache, scores, softmax, values,
projections), and with ``detail="all"`` each compute-shift step of a prefill GEMM inside
its operation. The hand-off between regions and the prompt's phases (weight skew, each
region's layers, the crossings, the KV hand-over) are spans of their own. Each operation's
``args`` split it into compute and communication on its critical path (the latest core's).
``detail`` bounds the size: ``all``, ``op`` (default), ``layer`` or ``step``. For ``bench``
and ``validate`` each row is a thread with one span and its phases.

The allreduce phases are not separate spans: the fused executor runs a collective as one
compiled program, so an operation's span holds its allreduce whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .engine import StepStats, WaferLlama
from .generate import Generation

DETAILS = ("all", "op", "layer", "step")
DEVICE, HOST = 1, 2  # trace process ids
Mark = tuple[str, float, float, float]  # label, cycles, compute on the critical path, host seconds (RunStats.phases)


def _span(name: str, pid: int, tid: int, ts: float, dur: float, **args: Any) -> dict[str, Any]:
    return {"name": name, "cat": "wafer", "ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": max(dur, 0.0),
            **({"args": args} if args else {})}


def _layers(marks: list[Mark]) -> list[tuple[str, list[Mark]]]:
    """Group a decode step's marks ``"layer:op"`` by layer, in order (a sub-mark goes with the operation after it)."""
    out: list[tuple[str, list[Mark]]] = []
    pending: list[Mark] = []
    for m in marks:
        if m[0].startswith("."):
            pending.append(m)
            continue
        layer, op = m[0].split(":", 1)
        if not out or out[-1][0] != layer:
            out.append((layer, []))
        out[-1][1].extend(pending + [(op, *m[1:])])
        pending = []
    return out


def _ops(marks: list[Mark], start: tuple[float, float, float], tid: int, t_dev: float, t_host: float | None,
         us: float, detail: str) -> tuple[list[dict[str, Any]], tuple[float, float, float]]:
    """Spans of consecutive operations from ``start`` (cycles, compute, host seconds at the previous mark), their
    compute and communication on the critical path in ``args``; host spans unless ``t_host`` is None; the parts
    (sub-marks) inside each operation with ``detail="all"``."""
    events: list[dict[str, Any]] = []
    part = start
    for label, end, compute, host_s in marks:
        end = max(end, part[0])  # a span ends no earlier than it begins
        if label.startswith("."):
            if detail == "all":
                events.append(_span(label[1:], DEVICE, tid, t_dev + part[0] * us, (end - part[0]) * us))
            part = (end, compute, host_s)
            continue
        if detail in ("all", "op"):
            comp = min(max(compute - start[1], 0.0), end - start[0])
            events.append(_span(label, DEVICE, tid, t_dev + start[0] * us, (end - start[0]) * us,
                                compute_cycles=comp, comm_cycles=end - start[0] - comp))
            if t_host is not None:
                events.append(_span(label, HOST, tid, t_host + start[2] * 1e6, (host_s - start[2]) * 1e6))
        start = part = (end, compute, host_s)
    return events, start


def _step_events(st: StepStats, index: int, t_dev: float, t_host: float, us: float, detail: str) -> list[dict[str, Any]]:
    """A decode step's spans, device time from ``t_dev`` and host time from ``t_host`` (microseconds)."""
    events, handoff = [], st.handoff_cycles / max(len(st.region_cycles) - 1, 1)
    host_each = st.host_s * 1e6 / len(st.region_cycles)  # without marks, the host's time is split evenly
    for region, cycles in enumerate(st.region_cycles):
        if region:
            events.append(_span("hand-off", DEVICE, region, t_dev, handoff * us, cycles=handoff))
            t_dev += handoff * us
        events.append(_span(f"step {index}", DEVICE, region, t_dev, cycles * us, cycles=cycles))
        phases = st.phases[region] if region < len(st.phases) else []
        host = phases[-1][3] * 1e6 if phases else host_each
        events.append(_span(f"step {index}", HOST, region, t_host, host))
        if detail != "step" and phases:
            start = (0.0, 0.0, 0.0)
            for layer, ops in _layers(phases):
                name = f"layer {layer}" if layer.isdigit() else "LM head"
                spans, end = _ops(ops, start, region, t_dev, t_host, us, detail)
                events += spans
                events.append(_span(name, DEVICE, region, t_dev + start[0] * us, (end[0] - start[0]) * us,
                                    cycles=end[0] - start[0]))
                events.append(_span(name, HOST, region, t_host + start[2] * 1e6, (end[2] - start[2]) * 1e6))
                start = end
        t_dev += cycles * us
        t_host += host
    return events


def _metadata(threads: list[str], device: str) -> list[dict[str, Any]]:
    events = [{"name": "process_name", "ph": "M", "pid": DEVICE, "args": {"name": f"device (predicted, {device})"}},
              {"name": "process_name", "ph": "M", "pid": HOST, "args": {"name": "host (emulator)"}}]
    for pid in (DEVICE, HOST):
        events += [{"name": "thread_name", "ph": "M", "pid": pid, "tid": i, "args": {"name": name}}
                   for i, name in enumerate(threads)]
    return events


def _check(detail: str) -> None:
    if detail not in DETAILS:
        raise ValueError(f"detail must be one of {DETAILS}, got {detail!r}")


def trace_events(engine: WaferLlama, generation: Generation, detail: str = "op") -> dict[str, Any]:
    """The generation's timeline as a Trace Event Format object (``traceEvents``, times in microseconds)."""
    _check(detail)
    clock = engine.device.clock_hz
    us = 1e6 / clock
    events = _metadata([f"region {r}" for r in range(len(engine.plans))], engine.device.name)
    t_dev = t_host = 0.0
    p = generation.prefill
    if p is not None:  # the prompt at once, then the KV hand-over before the second token
        events.append(_span("weight skew", DEVICE, 0, 0.0, p.relayout_cycles * us, cycles=p.relayout_cycles))
        t_dev = p.relayout_cycles * us
        crossing = p.crossing_cycles / max(len(p.region_cycles) - 1, 1)
        for region, cycles in enumerate(p.region_cycles):
            if region:
                events.append(_span("prompt crossing", DEVICE, region, t_dev, crossing * us, cycles=crossing))
                t_dev += crossing * us
            events.append(_span(f"prefill {p.tokens} tokens", DEVICE, region, t_dev, cycles * us, cycles=cycles))
            done = 0.0  # a layer starts where the previous one ended on its latest core (cores overlap the two)
            for i, (begin, end, phases) in enumerate(p.layers[region] if detail != "step" and p.layers else []):
                last = i == len(p.layers[region]) - 1 and engine.placement.regions[region].head
                events.append(_span("LM head" if last else f"layer {i}", DEVICE, region, t_dev + done * us,
                                    (end - done) * us, cycles=end - done))
                if detail != "layer":
                    events += _ops(phases, (done - begin, 0.0, 0.0), region, t_dev + begin * us, None, us, detail)[0]
                done = end
            t_dev += cycles * us
        events.append(_span(f"prefill {p.tokens} tokens", HOST, 0, 0.0, p.host_s * 1e6))
        t_host = p.host_s * 1e6
        events.append(_span("KV hand-over", DEVICE, len(p.region_cycles) - 1, t_dev, p.handover_cycles * us,
                            cycles=p.handover_cycles))
        t_dev += p.handover_cycles * us
    for i, st in enumerate(engine.totals.steps):
        events += _step_events(st, i, t_dev, t_host, us, detail)
        t_dev += st.cycles * us
        t_host += st.host_s * 1e6
    return {"traceEvents": events, "displayTimeUnit": "ns",
            "otherData": {"model": engine.cfg.name, "device": engine.device.name, "clock_hz": clock,
                          "mesh": list(engine.mesh), "tiles": list(engine.tiles), "detail": detail}}


def rows_trace(rows: list[dict[str, Any]], clock_hz: float, device: str, detail: str = "op") -> dict[str, Any]:
    """A trace of ``bench`` or ``validate`` rows: a thread per row with a ``phases`` list (``RunStats.phases``,
    a decode layer's ``"layer:op"`` labels as they are), one span of ``cycles`` and its phases inside."""
    _check(detail)
    us = 1e6 / clock_hz
    traced = [r for r in rows if "phases" in r]
    events = _metadata([r["label"] for r in traced], device)
    for tid, r in enumerate(traced):
        events.append(_span(r["label"], DEVICE, tid, 0.0, r["cycles"] * us, cycles=r["cycles"]))
        if r["phases"]:
            events.append(_span(r["label"], HOST, tid, 0.0, r["phases"][-1][3] * 1e6))
        if detail not in ("layer", "step"):
            marks = [(m[0].split(":", 1)[-1], *m[1:]) for m in r["phases"]]
            if all(m[0].startswith(".") for m in marks):  # a protocol of parts alone (a GEMM's steps): its phases
                marks = [(m[0][1:], *m[1:]) for m in marks]
            events += _ops(marks, (0.0, 0.0, 0.0), tid, 0.0, 0.0, us, detail)[0]
    return {"traceEvents": events, "displayTimeUnit": "ns", "otherData": {"device": device, "clock_hz": clock_hz}}


def write_trace(path: str | Path, trace: dict[str, Any]) -> None:
    """Write a trace object (``trace_events``, ``rows_trace``) as JSON to ``path``."""
    Path(path).write_text(json.dumps(trace))
