"""The validation report on a reduced set (small grids), and the calibration targets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llm.calibration import PARAMS, decode_layer, paper_cycles, params, row_names, selected, with_params
from llm.cli import main
from llm.config import preset
from wafer_actors.device import resolve


def test_calibration_targets_are_the_papers_llama3_8b_and_gemv_rows():
    # decode: 1.1e9 / (tokens/s x 32 layers); prefill: 4096 x 1.1e9 / (prompt tokens/s x 32)
    want = [12_732, 13_742, 15_323, 1_320, 2_233, 6_928_865, 5_623_663, 5_085_512]
    np.testing.assert_allclose(paper_cycles(), want, rtol=1e-3)
    assert len(row_names()) == len(want) and "prefill" in row_names()[-1]


def test_calibration_rows_are_chosen_by_kind_and_bad_kinds_are_refused():
    assert [row_names()[i] for i in selected(("gemv",))] == ["GEMV 16K 720x720", "GEMV 32K 720x720"]
    assert selected(("prefill", "decode")) == [0, 1, 2, 5, 6, 7]
    with pytest.raises(ValueError, match="decode, gemv, prefill"):
        selected(("decoder",))


def test_fitted_parameters_round_trip_through_a_device():
    theta = np.arange(1.0, len(PARAMS) + 1) * 1.5
    dev = with_params(resolve("wse2"), theta)
    np.testing.assert_array_equal(params(dev), theta)
    assert dev.rate("float32") == resolve("wse2").rate("float32")  # only float16's rate is fitted


def test_decode_layer_cost_grows_with_context_and_fits_sram():
    cfg, dev = preset("llama3-8b"), resolve("wse2")
    short, sram_short, _ = decode_layer(cfg, dev, 160, context=160)
    long, sram_long, cap = decode_layer(cfg, dev, 160, context=4096)
    assert long > short
    assert sram_short <= sram_long <= dev.sram_bytes
    assert cap >= 4096 // 160


def test_validate_runs_end_to_end_on_a_reduced_set(tmp_path, capsys):
    out, png = tmp_path / "v.json", tmp_path / "v.png"
    code = main(["validate", "--models", "llama3-8b,llama2-13b", "--grids", "160,200", "--prefill-grids", "220",
                 "--prefill-tokens", "200", "--gemv-grid", "64",
                 "--gemv-sizes", "1024,2048", "--gemm-grid", "16", "--gemm-n", "256", "--kv-grid", "240", "--workers", "2",
                 "--json", str(out), "--plot", str(png), "--trace", str(tmp_path / "t.json")])
    assert code == 0
    rows = json.loads(out.read_text())
    decode = [r for r in rows if r.get("phase") == "decode" and r["kernel"] == "faithful"]
    assert {(r["model"], r["grid"]) for r in decode} == {(m, g) for m in ("llama3-8b", "llama2-13b") for g in (160, 200)}
    paper = {(r["model"], r["grid"]): r for r in rows if r.get("phase") == "decode" and r["kernel"] == "paper"}
    assert set(paper) == {(m, g) for m in ("llama3-8b", "llama2-13b") for g in (160, 200)}
    for r in decode:
        assert r["predicted_cycles_per_layer"] > 0 and r["paper_tps"] is None and r["error"] is None  # no calibration row here
        assert r["host_s"] > 0
        if "failed" not in paper[r["model"], r["grid"]]:  # one head with K/V dim x dim: another kernel, other cycles
            assert paper[r["model"], r["grid"]]["predicted_cycles_per_layer"] != r["predicted_cycles_per_layer"]
        n_layers = preset(r["model"]).n_layers
        assert abs(r["predicted_tps"] * r["predicted_cycles_per_layer"] * n_layers - resolve("wse2").clock_hz) < 1e-3 * resolve("wse2").clock_hz
        assert r["sram_high_water_bytes"] <= r["sram_bytes"]
        assert 0 < r["mbu"] < 1 and 0 < r["mfu"] < 1  # of the whole wafer; of the regions the model needs:
        used = (r["regions_needed"] or 1) * r["grid"] ** 2
        assert r["mbu_cores_used"] / r["mbu"] == pytest.approx(resolve("wse2").cores / used)
    assert all(0 < r["mfu"] < 1 for r in rows if r.get("phase") == "prefill")
    gemv = [r for r in rows if r.get("kind") == "gemv"]
    assert len(gemv) == 2 and all(r["ratio"] > 1 for r in gemv)  # the K-tree beats the pipeline allreduce
    efficiency = [r for r in rows if r.get("kind") == "fig9_efficiency"]
    assert [r["N"] for r in efficiency] == [256, 512, 1024] and all("70%" in r["paper"] for r in efficiency)
    assert efficiency[0]["efficiency"] < efficiency[-1]["efficiency"] <= 1  # more work per step, less overhead
    latency = [r for r in rows if r.get("kind") == "fig9_latency"]
    assert {(r["grid"], r["algo"].split()[0]) for r in latency} == {(g, a) for g in (8, 10, 13, 16) for a in ("meshgemm", "cannon", "summa")}
    kv = next(r for r in rows if r.get("kind") == "kv_capacity")
    assert kv["shift"] == 240 * kv["concat"]
    assert png.stat().st_size > 1000
    trace = json.loads((tmp_path / "t.json").read_text())["traceEvents"]  # a thread per decode and prefill row
    threads = {e["args"]["name"] for e in trace if e["ph"] == "M" and e["name"] == "thread_name"}
    assert "llama3-8b faithful decode 160x160" in threads and "llama2-13b paper prefill 220x220" in threads
    row = next(r for r in decode if (r["model"], r["grid"]) == ("llama3-8b", 160))
    span = next(e for e in trace if e["ph"] == "X" and e["pid"] == 1 and e["name"] == "llama3-8b faithful decode 160x160")
    assert span["args"]["cycles"] == row["predicted_cycles_per_layer"]
    ops = [e for e in trace if e["ph"] == "X" and e["pid"] == 1 and e["tid"] == span["tid"] and "compute_cycles" in e.get("args", {})]
    assert [e["name"] for e in ops][:3] == ["attn_norm", "qkv", "rope_kv"]
    assert sum(e["dur"] for e in ops) == pytest.approx(span["dur"], rel=1e-9)
    assert all("phases" not in r for r in rows)
    prefill = [r for r in rows if r.get("phase") == "prefill" and r["kernel"] == "faithful"]
    assert {(r["model"], r["grid"]) for r in prefill} == {("llama3-8b", 220), ("llama2-13b", 220)}
    for r in prefill:  # 200 tokens is not the paper's 4K prompt: no paper figure to compare
        assert r["paper_tps"] is None and r["sram_high_water_bytes"] <= r["sram_bytes"]
        n_layers = preset(r["model"]).n_layers
        assert r["predicted_tps"] * r["predicted_cycles_per_layer"] * n_layers == pytest.approx(200 * resolve("wse2").clock_hz)
        assert r["skew_cycles_per_layer"] > 0 and r["handover_cycles_per_layer"] > 0
        # 220 x 220 cores hold 2.3 GB: the model is pipelined over several regions and the prompt crosses each edge
        assert r["regions_needed"] > 1 and r["crossing_cycles"] > (r["regions_needed"] - 1) * 220
    assert "prefill" in capsys.readouterr().out
