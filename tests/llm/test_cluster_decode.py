"""Decode with tiles on every node of a real 3-node Ray cluster (three raylets on this machine)."""

from __future__ import annotations

import pytest

from llm.engine import WaferLlama
from llm.generate import generate

pytestmark = pytest.mark.cluster


def test_default_model_tokens_match_a_single_process_run(ray_cluster_3_nodes, smollm2, tokenizer):
    cfg, w, _ = smollm2
    ids = tokenizer.encode("The capital")  # two tokens and three more: five decode steps on six Ray tiles
    runs = {}
    for name, transport, tiles in (("local", "local", (1, 1)), ("cluster", "ray", (1, 3))):  # two regions: six tiles
        with WaferLlama(cfg, w, mesh=(96, 96), tiles=tiles, transport=transport, tokens=len(ids) + 3) as m:
            runs[name] = generate(m, ids, max_new_tokens=3).output_ids
            if transport == "ray":
                nodes = set(m.wafer.nodes())
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


def test_scale_strong_decode_of_a_random_llama_shaped_model(ray_cluster_3_nodes):
    """The strong-scaling decode workload on seeded weights of a preset's shape, cut to two layers, on the region the
    command picks: two tiles give one tile's tokens (the NumPy reference's too) and cycles, with messages."""
    from llm import scale

    rows = scale.run("strong", [1, 2], "decode", model="random:smollm2-135m", layers=2, tokens=2)
    one, two = rows
    assert one["mesh"] == two["mesh"]
    assert one["matches_reference"] and two["matches_reference"]
    assert two["digest"] == one["digest"] and two["cycles"] == one["cycles"] and two["invariant"]
    assert one["messages_inside_nodes"] + one["messages_across_nodes"] == 0
    assert two["messages_inside_nodes"] + two["messages_across_nodes"] > 0


@pytest.mark.parametrize("join", [False, True], ids=["no --address", "--address"])
def test_generate_on_a_machine_where_a_cluster_runs(ray_cluster_3_nodes, join):
    """Without --address the command starts a private instance (Ray alone would join the running
    cluster); with the cluster's address it joins it. Either way it says which, and decodes."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "llm.cli", "generate", "--prompt", "Once upon a time", "--max-new-tokens", "2",
           "--prefill", "token", "--tiles", "1x1", "--mesh", "96x96"]
    out = subprocess.run(cmd + (["--address", ray_cluster_3_nodes.address] if join else []), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Once upon a time") and len(out.stdout.strip()) > len("Once upon a time")
    said = ("joined Ray instance at " + ray_cluster_3_nodes.address + " (3 node(s))" if join
            else "started a private Ray instance at ")
    assert said in out.stderr, out.stderr
    if not join:
        assert ray_cluster_3_nodes.address not in out.stderr


def test_generate_drains_a_node_while_decoding(ray_cluster_3_nodes, smollm2, tokenizer):
    """--drain-node moves the tiles of one node to another after two tokens: the reference's text all the same
    (one region, so that no node runs more worker processes than Ray expects: it would print warnings on stdout)."""
    import subprocess
    import sys

    from tests.helpers import reference_greedy

    prompt = "The capital of France is"
    new = reference_greedy(smollm2[0], smollm2[1], tokenizer.encode_prompt(prompt), 5)
    victim = next(iter(ray_cluster_3_nodes.worker_nodes)).node_id
    cmd = [sys.executable, "-m", "llm.cli", "generate", "--prompt", prompt, "--max-new-tokens", "5", "--prefill", "token",
           "--tiles", "1x3", "--mesh", "120x120", "--address", ray_cluster_3_nodes.address, "--drain-node", f"{victim[:10]}:2"]
    drained = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert drained.returncode == 0, drained.stderr
    assert drained.stdout == prompt + tokenizer.decode(new) + "\n"
    assert "moved tiles [" in drained.stderr and "while decoding (pause" in drained.stderr, drained.stderr
