"""The validation report on a reduced set (small grids), and the calibration targets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llm.calibration import bounded_lstsq, decode_layer, paper_cycles, params, row_names, selected, with_params
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
    theta = np.array([12.5, 2.25, 1.5, 300.0])
    dev = with_params(resolve("wse2"), theta)
    np.testing.assert_array_equal(params(dev), theta)
    assert dev.rate("float32") == resolve("wse2").rate("float32")  # only float16's rate is fitted


def test_bounded_least_squares_matches_a_brute_force_search():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(8, 3)), rng.normal(size=8)
    lower, upper = np.array([-0.1, -1.0, 0.0]), np.array([np.inf, 0.05, 2.0])
    x = bounded_lstsq(a, b, lower, upper)
    assert (x >= lower - 1e-12).all() and (x <= upper + 1e-12).all()
    grid = np.stack(np.meshgrid(*(np.linspace(lo, hi, 61) for lo, hi in zip(lower, [1.0, 0.05, 2.0])), indexing="ij"), -1).reshape(-1, 3)
    brute = ((grid @ a.T - b) ** 2).sum(1).min()
    cost = ((a @ x - b) ** 2).sum()
    assert cost <= brute + 1e-9
    unconstrained = np.linalg.lstsq(a, b, rcond=None)[0]
    assert cost > ((a @ unconstrained - b) ** 2).sum() + 1e-6  # the bounds were active here


def test_decode_layer_cost_grows_with_context_and_fits_sram():
    cfg, dev = preset("llama3-8b"), resolve("wse2")
    short, sram_short, _ = decode_layer(cfg, dev, 160, context=160)
    long, sram_long, cap = decode_layer(cfg, dev, 160, context=4096)
    assert long > short
    assert sram_short <= sram_long <= dev.sram_bytes
    assert cap >= 4096 // 160


def test_validate_runs_end_to_end_on_a_reduced_set(tmp_path, capsys):
    out, png = tmp_path / "v.json", tmp_path / "v.png"
    code = main(["validate", "--models", "llama3-8b,llama2-13b", "--grids", "160,200", "--prefill-grids", "240",
                 "--prefill-tokens", "320", "--gemv-grid", "64",
                 "--gemv-sizes", "1024,2048", "--gemm-grid", "16", "--gemm-n", "256", "--kv-grid", "240", "--workers", "2",
                 "--json", str(out), "--plot", str(png)])
    assert code == 0
    rows = json.loads(out.read_text())
    decode = [r for r in rows if r.get("phase") == "decode"]
    assert {(r["model"], r["grid"]) for r in decode} == {(m, g) for m in ("llama3-8b", "llama2-13b") for g in (160, 200)}
    for r in decode:
        assert r["predicted_cycles_per_layer"] > 0 and r["paper_tps"] is None  # no calibration row at these grids
        n_layers = preset(r["model"]).n_layers
        assert abs(r["predicted_tps"] * r["predicted_cycles_per_layer"] * n_layers - resolve("wse2").clock_hz) < 1e-3 * resolve("wse2").clock_hz
        assert r["sram_high_water_bytes"] <= r["sram_bytes"]
    gemv = [r for r in rows if r.get("kind") == "gemv"]
    assert len(gemv) == 2 and all(r["ratio"] > 1 for r in gemv)  # the K-tree beats the pipeline allreduce
    kv = next(r for r in rows if r.get("kind") == "kv_capacity")
    assert kv["shift"] == 240 * kv["concat"]
    assert png.stat().st_size > 1000
    prefill = [r for r in rows if r.get("phase") == "prefill"]
    assert {(r["model"], r["grid"]) for r in prefill} == {("llama3-8b", 240), ("llama2-13b", 240)}
    for r in prefill:  # 320 tokens is not the paper's 4K prompt: no paper figure to compare
        assert r["paper_tps"] is None and r["sram_high_water_bytes"] <= r["sram_bytes"]
        n_layers = preset(r["model"]).n_layers
        assert r["predicted_tps"] * r["predicted_cycles_per_layer"] * n_layers == pytest.approx(320 * resolve("wse2").clock_hz)
        assert r["skew_cycles_per_layer"] > 0 and r["handover_cycles_per_layer"] > 0
        # 240 x 240 cores hold 2.8 GB: the model is pipelined over several regions and the prompt crosses each edge
        assert r["regions_needed"] > 1 and r["crossing_cycles"] > (r["regions_needed"] - 1) * 240
    assert "prefill" in capsys.readouterr().out
