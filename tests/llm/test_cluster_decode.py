"""Decode with tiles on every node of a real 3-node Ray cluster (three raylets on this machine)."""

from __future__ import annotations

import pytest

from llm.engine import WaferLlama
from llm.generate import generate

pytestmark = pytest.mark.cluster


def test_default_model_tokens_match_a_single_process_run(ray_cluster_3_nodes, smollm2, tokenizer):
    cfg, w, _ = smollm2
    ids = tokenizer.encode("The capital of France is")
    runs = {}
    for name, transport, tiles in (("local", "local", (1, 1)), ("cluster", "ray", (1, 3))):
        with WaferLlama(cfg, w, mesh=(64, 64), tiles=tiles, transport=transport, tokens=len(ids) + 4) as m:
            runs[name] = generate(m, ids, max_new_tokens=4).output_ids
            if transport == "ray":
                nodes = {n for wafer in m.wafers for n in wafer.nodes()}
                assert len(nodes) == 3  # every node holds tiles of every region
            cycles = m.totals.cycles
        runs[name + "_cycles"] = cycles
    assert runs["cluster"] == runs["local"]
    assert runs["cluster_cycles"] == runs["local_cycles"]


def test_scale_strong_gemv_over_three_nodes(ray_cluster_3_nodes):
    from llm import scale

    rows = scale.run("strong", [1, 4], "gemv", side=32, per_core=4)
    one, four = rows
    assert one["invariant"] and four["invariant"]  # same result and cycles as one tile, and NumPy's
    assert four["nodes"] == 3 and len(four["per_node"]) == 3
    assert one["messages_across_nodes"] == 0 and four["messages_across_nodes"] > 0
    assert four["messages_inside_nodes"] + four["messages_across_nodes"] > 0
    assert {"wall_s", "wait_s", "tile_messages"} <= set(four["per_tile"][0])
    assert one["speedup"] == 1.0 and four["efficiency"] == four["speedup"] / 4
