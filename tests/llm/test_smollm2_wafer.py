"""The default model, SmolLM2-135M, decoded on the wafer: greedy ids identical to the NumPy
reference for 32 new tokens, on several prompts, 1 and 4 tiles, shift and concat KV caches.
(Shift on 4 tiles is covered with small models in test_wafer_decode.py; every run here takes a minute.)"""

from __future__ import annotations

import numpy as np
import pytest

from llm.engine import WaferLlama
from llm.generate import generate
from llm.reference import ReferenceModel

NEW = 32


def reference_greedy(cfg, w, prompt, new):
    ref = ReferenceModel(cfg, w, len(prompt) + new)
    logits = []
    for i, t in enumerate(prompt):
        out = ref.forward(t, i)
    logits.append(out)
    ids = []
    for i in range(new):
        ids.append(int(np.argmax(out)))
        if i < new - 1:
            out = ref.forward(ids[-1], len(prompt) + i)
            logits.append(out)
    return ids, logits


@pytest.mark.parametrize(
    "prompt, tiles, kv, regions",
    [
        ("The capital of France is", (1, 1), "shift", 1),
        ("def fibonacci(n):", (2, 2), "concat", 15),  # 15 regions: room for 40 entries in one row
        ("Once upon a time, a robot", (1, 1), "concat", 15),
    ],
)
def test_greedy_ids_and_logits_match_reference(smollm2, tokenizer, prompt, tiles, kv, regions):
    cfg, w, _ = smollm2
    ids = tokenizer.encode(prompt)
    expected_ids, expected_logits = reference_greedy(cfg, w, ids, NEW)
    with WaferLlama(cfg, w, mesh=(64, 64), tiles=tiles, transport="local", kv=kv, tokens=len(ids) + NEW, regions=regions) as m:
        out = generate(m, ids, max_new_tokens=NEW, keep_logits=True)
        summary = m.summary()
    assert out.output_ids == expected_ids
    assert len(out.logits) == NEW
    for got, want in zip(out.logits, expected_logits):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert summary["predicted"]["steps_per_s"] > 0
    assert summary["emulation"]["sram_high_water_bytes"] <= summary["emulation"]["sram_bytes"]
