"""Per-core compute cycles and per-link bytes recorded while tracing: a closed form for a shift, and the same
on both executors and every tiling for decode and prefill; the heatmap and its JSON hold them."""

from __future__ import annotations

import numpy as np
import pytest

from llm.checkpoint import random_weights
from llm.engine import WaferLlama
from llm.generate import generate
from llm.heatmap import draw, heatmap_data, heatmap_json
from wafer_actors import Spec, Wafer
from wafer_actors.collectives import shift

from .test_wafer_decode import TINY


@pytest.mark.parametrize("tiles", [(1, 1), (1, 2), (2, 2)])
def test_a_shift_east_puts_one_block_on_each_east_link(tiles):
    """Every core of a 2 x 4 mesh sends its 3-float block one core east (no wrap): 12 bytes on the east link of
    columns 0-2, nothing on any other link; nothing computed."""
    with Wafer((2, 4), tiles=tiles) as w:
        w.load("v", np.ones((2, 4, 3), np.float32), Spec("y", "x", None))
        w.trace(False, activity=True)
        w.run(shift, buffer="v", axis="x", disp=1, wrap=False)
        busy, links = w.activity()
    expected = np.zeros((4, 2, 4))
    expected[3, :, :3] = 12  # port 3: east
    np.testing.assert_array_equal(links, expected)
    assert not busy.any()


def run(executor: str, tiles: tuple[int, int], prefill: str):
    with WaferLlama(TINY, random_weights(TINY, seed=2), mesh=(6, 6), tiles=tiles, transport="local", tokens=8,
                    prefill_tokens=4, executor=executor, activity=True) as m:
        generate(m, [3, 1, 4, 1], max_new_tokens=3, prefill=prefill)
        return heatmap_data(m)[0], m.wafer.memory()[1]


@pytest.mark.parametrize("prefill", ["token", "mesh"])
def test_activity_is_the_same_on_both_executors_and_any_tiling(prefill, tmp_path):
    base, high = run("step", (1, 1), prefill)
    assert np.array_equal(base["sram_high_water_bytes"], high)
    assert base["compute_cycles"].min() > 0 and base["link_bytes_x"].sum() > 0 and base["link_bytes_y"].sum() > 0
    for tiles in [(1, 1), (2, 3)]:
        other, _ = run("fused", tiles, prefill)
        for key in base:
            np.testing.assert_array_equal(other[key], base[key], err_msg=f"{key} fused {tiles}")
    draw([base], tmp_path / "h.png", 48 * 1024, "tiny")
    assert (tmp_path / "h.png").stat().st_size > 5000
    report = heatmap_json([base])[0]
    assert report["mesh"] == [6, 6] and np.array_equal(report["link_bytes_x"], base["link_bytes_x"])


def test_large_meshes_are_downsampled_in_the_report():
    from llm.heatmap import downsample

    a = np.arange(128 * 70, dtype=float).reshape(128, 70)
    small = downsample(a, 64, np.sum)
    assert small.shape == (64, 35) and small.sum() == a.sum()  # blocks of 2 x 2 cells (the last column padded)
    assert downsample(a, 64, np.max)[-1, -1] == a.max()
