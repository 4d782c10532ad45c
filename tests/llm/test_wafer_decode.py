"""Decode on the wafer against the NumPy reference: small random models (fast, every layout
and KV mode, 1 and 4 tiles, regions, Ray) and the layout invariants of the KV cache."""

from __future__ import annotations

import numpy as np
import pytest

from llm.checkpoint import random_weights
from llm.config import LlamaConfig
from llm.decode_protocol import kv_rows
from llm.engine import WaferLlama
from llm.generate import generate
from llm.placement import PlacementError, place
from llm.reference import ReferenceModel
from wafer_actors.device import resolve

TINY = LlamaConfig("tiny", 3, 48, 80, 6, 2, 8, 100, 10000.0, 1e-5, 4096)  # GQA: 3 query heads per KV head


def reference_run(cfg, w, tokens):
    ref = ReferenceModel(cfg, w, len(tokens))
    return [ref.forward(t, i) for i, t in enumerate(tokens)]


@pytest.mark.parametrize(
    "mesh, tiles, kv, regions",
    [((4, 6), (1, 1), "shift", 1), ((4, 6), (2, 2), "shift", 1), ((4, 6), (1, 1), "concat", 1),
     ((4, 6), (2, 2), "concat", 1), ((3, 2), (1, 2), "shift", 3), ((5, 4), (2, 1), "shift", 2)],
)
def test_logits_match_reference_every_step(mesh, tiles, kv, regions):
    w = random_weights(TINY, seed=3)
    tokens = list(np.random.default_rng(0).integers(0, TINY.vocab_size, 14))
    expected = reference_run(TINY, w, tokens)
    with WaferLlama(TINY, w, mesh=mesh, tiles=tiles, transport="local", kv=kv, tokens=len(tokens), regions=regions) as m:
        assert len(m.wafer.regions) >= regions
        for t, want in zip(tokens, expected):
            got, stats = m.step(int(t))
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
            assert stats.cycles > 0


def test_cycles_do_not_depend_on_tiles():
    w = random_weights(TINY, seed=1)
    runs = []
    for tiles in ((1, 1), (2, 3)):
        with WaferLlama(TINY, w, mesh=(4, 6), tiles=tiles, transport="local", tokens=8) as m:
            runs.append([m.step(t)[1].cycles for t in (5, 6, 7, 8, 9)])
    assert runs[0] == runs[1]


def test_concat_row_becomes_the_bottleneck():
    """Attention work piles up on the tail row under concat; shift keeps the step cost flat."""
    w = random_weights(TINY, seed=1)
    cost = {}
    for kv in ("shift", "concat"):
        with WaferLlama(TINY, w, mesh=(4, 6), transport="local", kv=kv, tokens=24) as m:
            cost[kv] = [m.step(3)[1].cycles for _ in range(24)]
    assert cost["concat"][-1] > cost["shift"][-1]
    assert cost["concat"][-1] - cost["concat"][0] > 2 * (cost["shift"][-1] - cost["shift"][0])


def test_kv_rows_shift_stays_balanced_and_ordered():
    for rows in (1, 2, 5):
        for t in range(0, 23):
            counts, starts = kv_rows("shift", rows, t)
            assert counts.sum() == t and counts.max() - counts.min() <= 1
            ends = starts + counts
            assert starts[0] == 0 and (starts[1:] == ends[:-1]).all()  # row order is token order
            if t and rows > 1:  # each step the rows move at most one entry each, up
                before, _ = kv_rows("shift", rows, t - 1)
                assert np.abs(counts - before).sum() == 1 and counts[-1] >= 1
    counts, _ = kv_rows("concat", 4, 9)
    assert counts.tolist() == [0, 0, 0, 9]


def test_kv_capacity_concat_fails_long_before_shift():
    w = random_weights(TINY, seed=2)
    with WaferLlama(TINY, w, mesh=(4, 6), transport="local", kv="concat", tokens=4) as m:
        cap = m.placement.cap
        assert m.placement.capacity() == cap
        for _ in range(cap):
            m.step(1)
        with pytest.raises(PlacementError, match=rf"row 3 \(the tail row\).*room for {cap} tokens.*fits {4 * cap}"):
            m.step(1)
    shift = place(TINY, resolve("wse2"), 4, 6, kv_mode="shift", tokens=4)
    assert shift.capacity() == 4 * shift.cap and shift.cap == cap  # the ratio is the number of rows


def test_generate_refuses_before_any_work_when_the_cache_is_too_small():
    w = random_weights(TINY, seed=2)
    with WaferLlama(TINY, w, mesh=(4, 6), transport="local", kv="concat", tokens=4) as m:
        cap = m.placement.cap
        with pytest.raises(PlacementError, match="KV cache full"):
            generate(m, [1] * (cap - 2), max_new_tokens=8)
        assert m.pos == 0
        with pytest.raises(PlacementError, match="context of 4096 tokens"):
            generate(m, [1], max_new_tokens=5000)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            generate(m, [1, 100], max_new_tokens=2)


def test_model_too_large_for_the_wafer_is_refused_with_bytes():
    small = resolve("wse2")
    from dataclasses import replace

    tiny_wafer = replace(small, width=12, height=8)
    big = LlamaConfig("big", 16, 96, 256, 6, 2, 16, 512)
    with pytest.raises(PlacementError, match=r"needs \d+ regions of 4x4 cores .* MiB.*has room for 6"):
        place(big, tiny_wafer, 4, 4)
    with pytest.raises(PlacementError, match="one layer of big needs .* bytes per core on a 2x2 region"):
        place(big, tiny_wafer, 2, 2)


def test_generate_on_ray_tiles_matches_reference(ray_local):
    w = random_weights(TINY, seed=4)
    prompt = [3, 14, 15]
    ref = ReferenceModel(TINY, w, 16)
    for i, t in enumerate(prompt):
        logits = ref.forward(t, i)
    expected = []
    for i in range(5):
        tok = int(np.argmax(logits))
        expected.append(tok)
        logits = ref.forward(tok, len(prompt) + i)
    with WaferLlama(TINY, w, mesh=(4, 6), tiles=(2, 2), transport="ray", tokens=8) as m:
        out = generate(m, prompt, max_new_tokens=5)
        assert len(set(m.wafer.nodes())) == 1
    assert out.output_ids == expected


@pytest.mark.parametrize("kv", ["shift", "concat"])
def test_cost_only_predicts_the_same_cycles(kv):
    w = random_weights(TINY, seed=1)
    runs = []
    for cost_only in (False, True):
        with WaferLlama(TINY, None if cost_only else w, mesh=(4, 6), transport="local", kv=kv, tokens=12,
                        regions=2, cost_only=cost_only) as m:
            runs.append([m.step(3)[1].cycles for _ in range(12)])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("tiles, kv", [((1, 1), "shift"), ((1, 1), "concat"), ((2, 3), "shift"), ((3, 1), "concat")])
def test_fused_executor_decodes_exactly_as_the_step_executor(tiles, kv):
    """Logits bit for bit, cycles, per-token messages between cores and the SRAM high-water mark."""
    w = random_weights(TINY, seed=4)
    tokens = [int(t) for t in np.random.default_rng(1).integers(0, TINY.vocab_size, 9)]
    runs = {}
    for executor in ("step", "fused"):
        with WaferLlama(TINY, w, mesh=(6, 6), tiles=tiles, transport="local", kv=kv, tokens=len(tokens), executor=executor) as m:
            steps = [m.step(t) for t in tokens]
            runs[executor] = steps, m.sram_high_water()
    for (l1, s1), (l2, s2) in zip(runs["step"][0], runs["fused"][0]):
        np.testing.assert_array_equal(l2, l1)
        assert s2.cycles == s1.cycles
        for key in ("core_messages_local", "core_messages_remote", "core_bytes_local", "core_bytes_remote"):
            assert s2.counts[key] == s1.counts[key]
    assert runs["fused"][1] == runs["step"][1]
    assert sum(s.counts["steps_fused"] for _, s in runs["fused"][0]) > 0
