"""Timelines of a generation in Chrome's Trace Event Format (open in Perfetto or chrome://tracing).

Two processes: ``device (predicted)``, whose clock is the predicted device time, and
``host (emulator)``, the host's wall time of the same spans (where the emulator spends its
time). Each region is a thread. A decode step is a span per region, holding a span per
layer, holding a span per operation (the ``tile.mark`` phases of ``decode_protocol``: norms,
q/k/v with its allreduce, RoPE and the KV cache, scores, softmax, values, projections). The
hand-off between regions and the prompt's phases (weight skew, each region's layers, the
crossings, the KV hand-over) are spans of their own. Each operation span's ``args`` split it
into the compute and the communication on its critical path (the latest core's). ``detail``
bounds the size: ``op`` keeps every operation, ``layer`` stops at layers, ``step`` at steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .engine import StepStats, WaferLlama
from .generate import Generation

DETAILS = ("op", "layer", "step")
DEVICE, HOST = 1, 2  # trace process ids


def _span(name: str, pid: int, tid: int, ts: float, dur: float, **args: Any) -> dict[str, Any]:
    return {"name": name, "cat": "wafer", "ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": max(dur, 0.0),
            **({"args": args} if args else {})}


def _layers(phases: list[tuple[str, float, float, float]]) -> list[tuple[str, list[tuple[str, float, float, float]]]]:
    """Group a step's marks ``"layer:op"`` by layer, in order."""
    out: list[tuple[str, list]] = []
    for label, *rest in phases:
        layer, op = label.split(":", 1)
        if not out or out[-1][0] != layer:
            out.append((layer, []))
        out[-1][1].append((op, *rest))
    return out


def _ops(ops: list[tuple[str, float, float, float]], start: tuple[float, float, float], region: int, t_dev: float,
         t_host: float | None, us: float, keep: bool) -> tuple[list[dict[str, Any]], tuple[float, float, float]]:
    """Spans of consecutive operations from ``start`` (cycles, compute, host seconds at the previous mark): device
    spans with their compute and communication on the critical path, and host spans unless ``t_host`` is None."""
    events = []
    for op, end, compute, host_s in ops:
        end = max(end, start[0])  # an operation ends no earlier than the span it is in begins
        if keep:
            comp = min(max(compute - start[1], 0.0), end - start[0])
            events.append(_span(op, DEVICE, region, t_dev + start[0] * us, (end - start[0]) * us,
                                compute_cycles=comp, comm_cycles=end - start[0] - comp))
            if t_host is not None:
                events.append(_span(op, HOST, region, t_host + start[2] * 1e6, (host_s - start[2]) * 1e6))
        start = (end, compute, host_s)
    return events, start


def _step_events(st: StepStats, index: int, t_dev: float, t_host: float, clock_hz: float, detail: str
                 ) -> list[dict[str, Any]]:
    """A decode step's spans, device time from ``t_dev`` and host time from ``t_host`` (microseconds)."""
    us = 1e6 / clock_hz
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
            start = (0.0, 0.0, 0.0)  # cycles, compute, host seconds at the previous mark
            for layer, ops in _layers(phases):
                name = f"layer {layer}" if layer.isdigit() else "LM head"
                spans, end = _ops(ops, start, region, t_dev, t_host, us, detail == "op")
                events += spans
                events.append(_span(name, DEVICE, region, t_dev + start[0] * us, (end[0] - start[0]) * us,
                                    cycles=end[0] - start[0]))
                events.append(_span(name, HOST, region, t_host + start[2] * 1e6, (end[2] - start[2]) * 1e6))
                start = end
        t_dev += cycles * us
        t_host += host
    return events


def trace_events(engine: WaferLlama, generation: Generation, detail: str = "op") -> dict[str, Any]:
    """The generation's timeline as a Trace Event Format object (``traceEvents``, times in microseconds)."""
    if detail not in DETAILS:
        raise ValueError(f"detail must be one of {DETAILS}, got {detail!r}")
    clock = engine.device.clock_hz
    us = 1e6 / clock
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": DEVICE, "args": {"name": f"device (predicted, {engine.device.name})"}},
        {"name": "process_name", "ph": "M", "pid": HOST, "args": {"name": "host (emulator)"}},
    ]
    for pid in (DEVICE, HOST):
        events += [{"name": "thread_name", "ph": "M", "pid": pid, "tid": r, "args": {"name": f"region {r}"}}
                   for r in range(len(engine.plans))]
    t_dev = t_host = 0.0
    steps = engine.totals.steps
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
                events += _ops(phases, (done - begin, 0.0, 0.0), region, t_dev + begin * us, None, us, detail == "op")[0]
                done = end
            t_dev += cycles * us
        events.append(_span(f"prefill {p.tokens} tokens", HOST, 0, 0.0, p.host_s * 1e6))
        t_host = p.host_s * 1e6
        events.append(_span("KV hand-over", DEVICE, len(p.region_cycles) - 1, t_dev, p.handover_cycles * us,
                            cycles=p.handover_cycles))
        t_dev += p.handover_cycles * us
    for i, st in enumerate(steps):
        events += _step_events(st, i, t_dev, t_host, clock, detail)
        t_dev += st.cycles * us
        t_host += st.host_s * 1e6
    return {"traceEvents": events, "displayTimeUnit": "ns",
            "otherData": {"model": engine.cfg.name, "device": engine.device.name, "clock_hz": clock,
                          "mesh": list(engine.mesh), "tiles": list(engine.tiles), "detail": detail}}


def write_trace(path: str | Path, engine: WaferLlama, generation: Generation, detail: str = "op") -> None:
    """Write ``trace_events`` as JSON to ``path``."""
    Path(path).write_text(json.dumps(trace_events(engine, generation, detail)))
