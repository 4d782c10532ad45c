"""The calibration regression: the wse2 preset still predicts what its fit recorded, and that fit meets the paper.

The decode and GEMV rows run in full (a few seconds each, cost-only). A full prefill row
takes minutes, so the test runs the reduced prefill rows instead (``reduced_prefill_layer``:
the same per-core blocks on a 120 x 120 region); ``llm.calibration`` says how the full
rows follow them.
"""

from __future__ import annotations

import numpy as np
import pytest

from llm import calibration
from llm.calibration import (
    DECODE_ROWS,
    PARAMS,
    PREFILL_ROWS,
    PRESET_CYCLES,
    REDUCED_PRESET_CYCLES,
    fit,
    paper_cycles,
    params,
    predict,
    reduced_prefill_layer,
    report,
    selected,
    with_params,
)
from llm.validate import decode_row
from wafer_actors.device import resolve


def test_decode_and_gemv_rows_stay_within_1pct_of_the_recorded_fit():
    dev = resolve("wse2")
    rows = selected(("decode", "gemv"))
    got = [calibration._row(dev, i) for i in rows]
    np.testing.assert_allclose(got, np.array(PRESET_CYCLES)[rows], rtol=0.01)


def test_reduced_prefill_rows_stay_within_1pct_of_the_recorded_fit():
    got = [reduced_prefill_layer(resolve("wse2"), grid) for grid, _ in PREFILL_ROWS]
    np.testing.assert_allclose(got, REDUCED_PRESET_CYCLES, rtol=0.01)


def test_the_recorded_fit_meets_every_calibration_row_within_3pct():
    errors = np.array(PRESET_CYCLES) / paper_cycles() - 1
    assert np.abs(errors).max() <= 0.03, errors
    decode = np.array(PRESET_CYCLES)[selected(("decode",))]
    assert (np.diff(decode) > 0).all()  # decode tokens/s falls as the grid grows, as in Table 4


def test_a_calibration_row_of_validate_carries_the_papers_figure_and_its_error():
    grid, tps = DECODE_ROWS[0]
    row = decode_row("llama3-8b", resolve("wse2"), grid, kernel="paper")
    assert row["kernel"] == "paper" and row["paper_tps"] == tps
    assert row["error"] == pytest.approx(row["predicted_tps"] / tps - 1)
    assert abs(row["error"]) < 0.04


def test_the_solver_brings_a_perturbed_device_back_to_the_gemv_rows():
    """least_squares on the real (cost-only) GEMV rows from a start 40% off in beta and the rate."""
    base = resolve("wse2")
    start = params(base) * np.array([1.4, 0.6] + [1.0] * (len(PARAMS) - 2))
    before = predict(with_params(base, start), kinds=("gemv",)) / paper_cycles()[selected(("gemv",))] - 1
    result = fit(base, start=tuple(start), kinds=("gemv",), max_evaluations=4)
    assert np.abs(result.errors).max() < np.abs(before).max() / 4
    assert (params(result.device) >= [p.lower for p in PARAMS]).all()
    lines = report(result)
    assert len(lines) == len(PARAMS) + 2 + 1 and "GEMV 16K" in lines[len(PARAMS)]
