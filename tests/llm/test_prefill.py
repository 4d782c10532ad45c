"""Prefill on the wafer against the NumPy reference: logits at every prompt position, the KV
cache after the hand-over against the token-by-token path, memory, refusals, cost-only."""

from __future__ import annotations

import numpy as np
import pytest

from llm.checkpoint import random_weights
from llm.config import LlamaConfig
from llm.decode_protocol import kv_rows
from llm.engine import WaferLlama
from llm.generate import generate
from llm.placement import PlacementError, place
from llm.prefill_protocol import handover_rounds
from llm.reference import ReferenceModel
import wafer_actors.tile as tile_module
from wafer_actors.device import resolve

TINY = LlamaConfig("tiny", 3, 48, 80, 6, 2, 8, 100, 10000.0, 1e-5, 4096)  # GQA: 3 query heads per KV head
PROMPT = [int(t) for t in np.random.default_rng(0).integers(0, TINY.vocab_size, 14)]


@pytest.fixture(scope="module")
def weights():
    return random_weights(TINY, seed=3)


@pytest.fixture(scope="module")
def reference(weights):
    ref = ReferenceModel(TINY, weights, 32)
    return np.stack([ref.forward(t, i) for i, t in enumerate(PROMPT)])


def close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("mesh, tiles, kv, regions", [
    (4, (1, 1), "shift", 1), (4, (2, 2), "shift", 1), (4, (2, 2), "concat", 1), (5, (1, 1), "shift", 1),
    (3, (1, 1), "shift", 2), (3, (1, 2), "shift", 3), (6, (2, 3), "concat", 1),
    (16, (1, 1), "shift", 1),  # 16: one token per row, rows left empty
])
def test_prefill_logits_every_position(weights, reference, mesh, tiles, kv, regions):
    with WaferLlama(TINY, weights, mesh=(mesh, mesh), tiles=tiles, transport="local", kv=kv, tokens=24,
                    regions=regions, prefill_tokens=len(PROMPT)) as m:
        assert len(m.wafer.regions) >= regions
        logits, stats = m.prefill(PROMPT)
        assert logits.shape == (len(PROMPT), TINY.vocab_size)
        close(logits, reference)
        assert stats.ttft_cycles > sum(stats.region_cycles) > 0 and stats.handover_cycles > 0
        assert (stats.crossing_cycles > 0) == (len(m.wafer.regions) > 1)  # the prompt crossed as a transfer
        assert m.pos == len(PROMPT)


@pytest.mark.parametrize("kv, tiles", [("shift", (1, 1)), ("concat", (2, 2))])
def test_handover_leaves_the_cache_and_weights_decode_expects(weights, kv, tiles):
    """After prefill + hand-over, the KV cache equals the one the token path builds and the
    weights are back in decode's layout, bit for bit."""
    def state(m):
        w = m.wafer
        return {n: w.blocks(n) for n in ("k_cache", "v_cache", "wqkv", "wo", "w13", "w2", "attn_norm", "lm_head")}

    with WaferLlama(TINY, weights, mesh=(4, 4), tiles=tiles, transport="local", kv=kv, tokens=24,
                    prefill_tokens=len(PROMPT)) as a, \
         WaferLlama(TINY, weights, mesh=(4, 4), tiles=tiles, transport="local", kv=kv, tokens=24) as b:
        loaded = state(a)
        a.prefill(PROMPT)
        for t in PROMPT:
            b.step(t)
        after, token_path = state(a), state(b)
        for n in ("wqkv", "wo", "w13", "w2", "attn_norm", "lm_head"):
            np.testing.assert_array_equal(after[n], loaded[n])
        counts, starts = kv_rows(kv, 4, len(PROMPT))
        for n in ("k_cache", "v_cache"):  # [row, col, layer, slot, kv]; the token path leaves stale copies behind
            for row in range(4):
                slots = (starts[row] + np.arange(counts[row])) % np.array([a.placement.cap, b.placement.cap])[:, None]
                got, want = after[n][row][:, :, slots[0]], token_path[n][row][:, :, slots[1]]
                assert got.shape[2] == counts[row]
                if counts[row]:
                    assert np.abs(want).max() > 0
                    close(got, want)
        close(a.step(7)[0], b.step(7)[0])


def test_generate_with_prefill_matches_reference_greedy(weights):
    ref = ReferenceModel(TINY, weights, 32)
    want, logits = [], None
    for i, t in enumerate(PROMPT):
        logits = ref.forward(t, i)
    for i in range(6):
        want.append(int(np.argmax(logits)))
        logits = ref.forward(want[-1], len(PROMPT) + i)
    for tiles in ((1, 1), (2, 2)):
        with WaferLlama(TINY, weights, mesh=(4, 4), tiles=tiles, transport="local", tokens=24, prefill_tokens=14) as m:
            out = generate(m, PROMPT, max_new_tokens=6, prefill="mesh")
            assert out.output_ids == want
            t = out.timing(m.device.clock_hz)
            assert t["ttft_s"] > 0 and t["decode_tokens_per_s"] > 0 and out.decode_steps == 5
            assert t["e2e_tokens_per_s"] == pytest.approx(6 / (t["ttft_s"] + out.decode_cycles / m.device.clock_hz))


def test_prefill_on_ray_tiles(weights, reference, ray_local):
    with WaferLlama(TINY, weights, mesh=(4, 4), tiles=(2, 2), transport="ray", tokens=24, prefill_tokens=14) as m:
        close(m.prefill(PROMPT)[0], reference)


def test_cycles_do_not_depend_on_tiles_and_cost_only_agrees(weights):
    runs = []
    for tiles, cost_only in (((1, 1), False), ((2, 2), False), ((1, 1), True)):
        with WaferLlama(TINY, None if cost_only else weights, mesh=(4, 4), tiles=tiles, transport="local", tokens=24,
                        prefill_tokens=14, cost_only=cost_only) as m:
            _, s = m.prefill(len(PROMPT) if cost_only else PROMPT)
            runs.append((s.relayout_cycles, s.region_cycles, s.handover_cycles, s.sram_high_water_bytes))
    assert runs[0] == runs[1] == runs[2]


def test_memory_high_water_is_what_placement_reserved(weights):
    """The prefill's peak per-core bytes (double buffers included) are exactly what placement counted."""
    with WaferLlama(TINY, weights, mesh=(4, 4), transport="local", tokens=24, prefill_tokens=14) as m:
        r = m.placement.regions[0]
        before = m.sram_high_water()
        assert before == r.bytes_fixed + r.cap * (r.bytes_slot - 4 * TINY.n_heads)  # decode's scores come and go
        m.prefill(PROMPT)
        assert m.sram_high_water() == before + r.bytes_prefill
        assert m.sram_high_water() <= m.device.sram_bytes


def test_prompt_too_long_is_refused_with_the_limit(weights):
    with WaferLlama(TINY, weights, mesh=(4, 4), transport="local", tokens=24, prefill_tokens=8) as m:
        with pytest.raises(PlacementError, match=r"14-token prompt .* room for 8 tokens \(2 per row\)"):
            m.prefill(PROMPT)
        with pytest.raises(PlacementError, match="room for 8 tokens"):
            generate(m, PROMPT, max_new_tokens=2, prefill="mesh")
    small = resolve("wse2").replace(sram_bytes=6000)
    with pytest.raises(PlacementError, match=r"prefill on the wafer \(24 tokens per row"):
        place(TINY, small, 4, 4, tokens=100, prefill_tokens=96)
    with pytest.raises(PlacementError, match="square region"):
        place(TINY, resolve("wse2"), 4, 6, prefill_tokens=8)


@pytest.mark.parametrize("height, tokens, mode", [(4, 14, "shift"), (16, 14, "shift"), (5, 23, "shift"), (4, 14, "concat")])
def test_handover_rounds_move_every_token_once_to_its_decode_row(height, tokens, mode):
    st, cap = -(-tokens // height), 64
    rounds = handover_rounds(height, st, tokens, mode, cap)
    counts, starts = kv_rows(mode, height, tokens)
    seen = []
    for moves in rounds:
        assert len(set(moves[:, 0])) == len(moves) and len(set(moves[:, 2])) == len(moves)  # no row twice per round
        assert (moves[:, 2] >= moves[:, 0]).all()  # everything moves south (or stays)
        for src, sslot, dst, dslot in moves:
            t = src * st + sslot
            assert starts[dst] <= t < starts[dst] + counts[dst] and dslot == t % cap
            seen.append(t)
    assert sorted(seen) == list(range(tokens))
    assert len(rounds) == (tokens if mode == "concat" else st)


def test_lm_head_in_column_chunks_matches_reference_and_reserved_memory():
    """A vocabulary wider than the FFN makes the LM head run (and skew) in several column chunks."""
    from llm.prefill_protocol import head_chunks

    cfg = LlamaConfig("wide-vocab", 2, 48, 80, 6, 2, 8, 300, 10000.0, 1e-5, 4096)
    assert len(head_chunks(12, 75, 2 * 20)) == 2  # 4x4: 75 vocab and 20 FFN columns per core
    w = random_weights(cfg, seed=5)
    ref = ReferenceModel(cfg, w, 16)
    want = np.stack([ref.forward(t, i) for i, t in enumerate(PROMPT)])
    with WaferLlama(cfg, w, mesh=(4, 4), transport="local", tokens=16, prefill_tokens=14) as m:
        before, r = m.sram_high_water(), m.placement.regions[0]
        close(m.prefill(PROMPT)[0], want)
        assert m.sram_high_water() == before + r.bytes_prefill


def test_map_overhead_adds_one_map_per_row_of_b_per_gemm_step_and_one_per_decode_gemv():
    """A tile GEMM step runs one @map per row of its B block: per layer and core, P steps each of QKV
    and W13 (dt rows), scores and W_O (G x kvt), P . V (G x st keys) and W2 (ft); decode's seven
    GEMVs run one @map each."""
    runs = {}
    for m_cost in (0.0, 2.0):
        dev = resolve("wse2").replace(name="m", map_overhead=m_cost)
        with WaferLlama(TINY, None, mesh=(4, 4), device=dev, transport="local", tokens=24, prefill_tokens=14,
                        cost_only=True, lm_head=False) as m:
            _, s = m.prefill(len(PROMPT))
            runs[m_cost] = (s.region_cycles[0], m.step(0)[1].cycles)
            shape, groups = m.placement.shape, TINY.n_heads // TINY.n_kv_heads
    st = -(-len(PROMPT) // 4)
    rows = 2 * shape.dt + 2 * groups * shape.kvt + groups * st + shape.ft
    assert runs[2.0][0] - runs[0.0][0] == pytest.approx(TINY.n_layers * 4 * rows * 2.0)
    # a decode map can hide behind a message still in flight (the KV shift), so at most seven per layer add
    assert TINY.n_layers * 2.0 <= runs[2.0][1] - runs[0.0][1] <= TINY.n_layers * 7 * 2.0


@pytest.mark.parametrize("tiles", [(1, 1), (2, 2)])
@pytest.mark.parametrize("split", [False, True], ids=["serial", "split"])
def test_fused_executor_prefills_exactly_as_the_step_executor(weights, tiles, split, monkeypatch):
    """Prompt logits bit for bit, every phase's cycles, then the first decode step after the hand-over.

    ``split``: the GEMM shifts are timed on parallel threads (as large meshes are), not serially.
    """
    if split:
        monkeypatch.setattr(tile_module, "SPLIT_FLOWS", 2)
    out = {}
    for executor in ("step", "fused"):
        with WaferLlama(TINY, weights, mesh=(6, 6), tiles=tiles, transport="local", tokens=len(PROMPT) + 1,
                        prefill_tokens=len(PROMPT), executor=executor) as m:
            logits, st = m.prefill(PROMPT)
            nxt, dst = m.step(PROMPT[0])
            out[executor] = logits, st, nxt, dst.cycles
    (l1, s1, n1, c1), (l2, s2, n2, c2) = out["step"], out["fused"]
    np.testing.assert_array_equal(l2, l1)
    np.testing.assert_array_equal(n2, n1)
    assert (s2.relayout_cycles, s2.region_cycles, s2.handover_cycles, s2.sram_high_water_bytes, c2) == \
           (s1.relayout_cycles, s1.region_cycles, s1.handover_cycles, s1.sram_high_water_bytes, c1)


@pytest.mark.parametrize("tiles", [(1, 1), (2, 1)])
def test_fused_executor_runs_the_lm_head_chunks_exactly_as_the_step_executor(tiles):
    """The LM head's column chunks are views of its blocks, which the fused executor reads through a contiguous copy."""
    cfg = LlamaConfig("wide-vocab", 1, 48, 80, 6, 2, 8, 300, 10000.0, 1e-5, 4096)  # 4x4: two chunks (as above)
    w = random_weights(cfg, seed=5)
    out = {}
    for executor in ("step", "fused"):
        with WaferLlama(cfg, w, mesh=(4, 4), tiles=tiles, transport="local", tokens=16, prefill_tokens=14,
                        executor=executor) as m:
            logits, st = m.prefill(PROMPT)
            out[executor] = logits, st.region_cycles, st.sram_high_water_bytes
    np.testing.assert_array_equal(out["fused"][0], out["step"][0])
    assert out["fused"][1:] == out["step"][1:]


def test_fused_executor_costs_shapes_exactly_as_the_step_executor():
    """Cost-only (no data in the compiled loops): the same cycles for prefill and the decode step after it."""
    cycles = {}
    for executor in ("step", "fused"):
        with WaferLlama(TINY, None, mesh=(6, 6), tiles=(2, 1), transport="local", tokens=len(PROMPT) + 1,
                        prefill_tokens=len(PROMPT), cost_only=True, executor=executor) as m:
            _, st = m.prefill(len(PROMPT))
            cycles[executor] = (st.relayout_cycles, st.region_cycles, st.handover_cycles, m.step(0)[1].cycles,
                                m.wafer.clocks().tolist())
    assert cycles["fused"] == cycles["step"]
