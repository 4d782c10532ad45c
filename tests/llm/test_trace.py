"""The timeline of a generation: valid Trace Event Format, spans nested in time, each layer the sum of its
operations and each step the sum of its regions' spans and hand-offs, in predicted device time."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llm.checkpoint import random_weights
from llm.engine import WaferLlama
from llm.generate import generate
from llm.trace import DEVICE, HOST, trace_events

from .test_wafer_decode import TINY

OPS = ["attn_norm", "qkv", "rope_kv", "scores", "softmax", "attn_values", "attn_out", "ffn_norm", "gate_up", "down"]
HEAD_OPS = {"decode": ["lm_head"], "prefill": ["final_norm", "lm_head"]}


def run(prefill: str, regions: int):
    engine = WaferLlama(TINY, random_weights(TINY, seed=2), mesh=(4, 4), tiles=(2, 2), transport="local", tokens=10,
                        regions=regions, prefill_tokens=4 if prefill == "mesh" else 0, trace=True)
    with engine:
        out = generate(engine, [3, 1, 4, 1], max_new_tokens=4, prefill=prefill)
    return engine, out


def inside(child, parent) -> bool:
    eps = 1e-6 * max(1.0, parent["dur"])
    return parent["ts"] - eps <= child["ts"] and child["ts"] + child["dur"] <= parent["ts"] + parent["dur"] + eps


@pytest.mark.parametrize("prefill, regions", [("token", 2), ("mesh", 1)])
def test_the_trace_is_valid_and_adds_up(prefill, regions):
    engine, out = run(prefill, regions)
    trace = json.loads(json.dumps(trace_events(engine, out)))
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    for e in spans:
        assert {"name", "ph", "ts", "dur", "pid", "tid"} <= set(e) and e["dur"] >= 0 and e["ts"] >= 0
    us = 1e6 / engine.device.clock_hz
    device = [e for e in spans if e["pid"] == DEVICE]
    steps = [e for e in device if e["name"].startswith("step ")]
    assert len(steps) == len(engine.totals.steps) * regions
    handoffs = [e for e in device if e["name"] == "hand-off"]
    assert len(handoffs) == len(engine.totals.steps) * (regions - 1)
    for i, st in enumerate(engine.totals.steps):  # a step: its regions one after another, a hand-off between two
        mine = [e for e in steps if e["name"] == f"step {i}"]
        assert sum(e["dur"] for e in mine) == pytest.approx((st.cycles - st.handoff_cycles) * us, rel=1e-9)
        assert [e["tid"] for e in mine] == list(range(regions))
        assert all(a["ts"] + a["dur"] <= b["ts"] + 1e-9 for a, b in zip(mine, mine[1:]))
    assert sum(e["dur"] for e in handoffs) == pytest.approx(sum(st.handoff_cycles for st in engine.totals.steps) * us)
    prompt = [e for e in device if e["name"] == "prefill 4 tokens"]
    layers = [e for e in device if e["name"].startswith("layer ") or e["name"] == "LM head"]
    assert len(layers) == (len(engine.totals.steps) + len(prompt)) * (TINY.n_layers + 1)
    ops = [e for e in device if "compute_cycles" in e.get("args", {})]
    for layer in layers:
        parent = [s for s in steps + prompt if s["tid"] == layer["tid"] and inside(layer, s)]
        assert len(parent) == 1
        phase = "prefill" if parent[0] in prompt else "decode"
        children = [e for e in ops if e["tid"] == layer["tid"] and inside(e, layer)]
        assert [e["name"] for e in children] == (HEAD_OPS[phase] if layer["name"] == "LM head" else OPS)
        assert sum(e["dur"] for e in children) == pytest.approx(layer["dur"], rel=1e-9, abs=1e-9)
        assert all(e["args"]["compute_cycles"] >= 0 and e["args"]["comm_cycles"] >= -1e-9 for e in children)
    assert sum(e["dur"] for e in layers if e["name"] != "LM head") > 0
    assert any(e["args"]["comm_cycles"] > 0 for e in ops) and any(e["args"]["compute_cycles"] > 0 for e in ops)
    assert {e["pid"] for e in spans} == {DEVICE, HOST}
    if prefill == "mesh":
        assert [e["name"] for e in device[:2]] == ["weight skew", "prefill 4 tokens"]
        assert any(e["name"] == "KV hand-over" for e in device)
        in_prompt = [e for e in layers if inside(e, prompt[0])]
        assert sum(e["dur"] for e in in_prompt) == pytest.approx(prompt[0]["dur"], rel=1e-9)  # the layers fill it


@pytest.mark.parametrize("tiles", [(1, 1), (1, 3)])
def test_phases_are_the_same_on_both_executors_and_any_tiling(tiles):
    """The marks read the cores' clocks, which the executors and tilings keep identical."""
    runs = []
    for executor, t in (("step", (1, 1)), ("fused", tiles)):
        with WaferLlama(TINY, random_weights(TINY, seed=2), mesh=(4, 6), tiles=t, transport="local", tokens=3,
                        executor=executor, trace=True) as m:
            runs.append([[(label, cycles, compute) for label, cycles, compute, _ in m.step(5)[1].phases[0]],
                         [(label, cycles, compute) for label, cycles, compute, _ in m.step(7)[1].phases[0]]])
    assert runs[0] == runs[1]
    assert sum(not m[0].startswith(".") for m in runs[0][0]) == TINY.n_layers * len(OPS) + 1  # and the LM head
    assert sum(m[0] == ".broadcast" for m in runs[0][0]) == TINY.n_layers * 10 + 2  # 10 allreduces a layer, 2 in the head


@pytest.mark.parametrize("executor", ["step", "fused"])
def test_tracing_changes_no_value_and_no_cycle(executor):
    """Traced, each allreduce runs phase by phase (to mark them): the same steps, the same numbers."""
    runs = []
    for trace in (False, True):
        with WaferLlama(TINY, random_weights(TINY, seed=2), mesh=(4, 6), tiles=(2, 3), transport="local", tokens=4,
                        prefill_tokens=0, executor=executor, trace=trace) as m:
            runs.append([m.step(t) for t in (5, 7, 9)])
    for (a, sa), (b, sb) in zip(*runs):
        assert np.array_equal(a, b) and sa.cycles == sb.cycles


def test_all_detail_shows_each_gemm_step_inside_its_operation():
    """A mesh prefill on 4 x 4 cores: the q/k/v MeshGEMM of every layer runs 4 compute-shift steps, each a span
    inside the layer's qkv span; a decode step's q/k/v holds its GEMV and its allreduce's phases; ``layer`` detail
    keeps no operation."""
    engine, out = run("mesh", 1)
    spans = [e for e in trace_events(engine, out, "all")["traceEvents"] if e["ph"] == "X" and e["pid"] == DEVICE]
    prompt = next(e for e in spans if e["name"] == "prefill 4 tokens")
    qkv = [e for e in spans if e["name"] == "qkv" and inside(e, prompt)]
    assert len(qkv) == TINY.n_layers
    for op in qkv:
        steps = [e for e in spans if e["name"] == "meshgemm step" and inside(e, op)]
        assert len(steps) == 4 and all(a["ts"] + a["dur"] <= b["ts"] + 1e-9 for a, b in zip(steps, steps[1:]))
    step = next(e for e in spans if e["name"] == "step 0")
    op = next(e for e in spans if e["name"] == "qkv" and inside(e, step))
    parts = [e["name"] for e in spans if e["tid"] == op["tid"] and inside(e, op) and e is not op]
    assert parts[0] == "compute" and parts[-1] == "broadcast" and "allreduce phase 1" in parts
    names = {e["name"] for e in trace_events(engine, out, "layer")["traceEvents"] if e["ph"] == "X"}
    assert not names & set(OPS) and "layer 0" in names
