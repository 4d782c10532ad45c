"""``wafer-llm generate --cost-only``: a model's shapes laid over the whole device, and its refusals."""

from __future__ import annotations

import json

import pytest

from llm.cli import main
from llm.regions import snake
from wafer_actors import preset


@pytest.mark.parametrize("side, n", [(249, 11), (100, 63), (48, 6)])
def test_snake_order_keeps_consecutive_regions_side_by_side(side, n):
    """Regions in snake order lie on the fabric, none overlaps another, and each shares an edge with the next."""
    dev = preset("wse2")
    origins = snake((dev.height, dev.width), (side, side), n)
    assert len(set(origins)) == n
    for y, x in origins:
        assert 0 <= y and y + side <= dev.height and 0 <= x and x + side <= dev.width
    for (y0, x0), (y1, x1) in zip(origins, origins[1:]):
        assert abs(y1 - y0) + abs(x1 - x0) == side and (y0 == y1 or x0 == x1)


def test_a_model_the_device_cannot_hold_is_refused_with_the_bytes(capsys):
    """LLaMA2-13B with room to prefill 4,000 tokens does not fit WSE-2: refused at once, bytes needed and available."""
    code = main(["generate", "--cost-only", "--model", "llama2-13b", "--prompt-tokens", "4000", "--max-new-tokens", "4"])
    assert code == 2
    err = capsys.readouterr().err
    assert "GiB of core memory), the nearest fit" in err and "34.5 GiB in all" in err and "--one-layer" in err


def test_a_small_fabric_holds_the_model_on_regions_in_snake_order(tmp_path, capsys):
    """SmolLM2-135M's shapes on a 96x144-core fabric: six 48x48 regions cover it, laid in snake order, each under
    its cores' SRAM; one layer measured and scaled (the paper's method) agrees with the run of every layer to
    within the LM head and the hand-offs it leaves out."""
    dev = tmp_path / "small.toml"
    dev.write_text('base = "wse2"\nwidth = 144\nheight = 96\n')
    full, one = tmp_path / "full.json", tmp_path / "one.json"
    common = ["generate", "--cost-only", "--model", "smollm2-135m", "--prompt-tokens", "32", "--max-new-tokens", "4",
              "--device", str(dev)]
    assert main([*common, "--json", str(full)]) == 0
    out = capsys.readouterr().out
    assert "6 region(s) of 48x48 cores in snake order" in out and "all 30 layers run" in out
    r = json.loads(full.read_text())
    assert (r["side"], r["regions"], r["regions_fit"], r["idle_cores"]) == (48, 6, 6, 0)
    assert [tuple(t["origin"]) for t in r["region_table"]] == [(0, 0), (0, 48), (0, 96), (48, 96), (48, 48), (48, 0)]
    assert sum(t["layers"] for t in r["region_table"]) == 30 and r["region_table"][-1]["lm_head"]
    assert all(0 < t["sram_high_water_bytes"] <= 48 * 1024 for t in r["region_table"])
    assert r["handoff_cycles_per_token"] > 0 and r["handover_cycles"] > 0
    assert main([*common, "--one-layer", "--mesh", "48x48", "--json", str(one)]) == 0
    s = json.loads(one.read_text())
    assert s["method"].startswith("one layer measured and scaled x30")
    assert 0.85 * r["decode_cycles_per_token"] < s["decode_cycles_per_token"] < r["decode_cycles_per_token"]
    assert 0.8 * r["ttft_s"] < s["ttft_s"] < r["ttft_s"]


def test_one_new_token_is_the_prefill_alone(tmp_path, capsys):
    """--max-new-tokens 1: the first token comes from the prefill, so no decode figures are reported."""
    dev = tmp_path / "small.toml"
    dev.write_text('base = "wse2"\nwidth = 144\nheight = 96\n')
    for extra in ([], ["--one-layer", "--mesh", "48x48"]):
        out = tmp_path / "r.json"
        assert main(["generate", "--cost-only", "--model", "smollm2-135m", "--prompt-tokens", "16", "--max-new-tokens",
                     "1", "--device", str(dev), "--json", str(out), *extra]) == 0
        r = json.loads(out.read_text())
        assert r["ttft_s"] > 0 and r["decode_tps"] is None and r["handover_cycles"] is None
        text = capsys.readouterr().out
        assert "decode:" not in text and "second token" not in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cost-only", "--model", "llama3-8b"], "--cost-only needs --prompt-tokens"),
        (["--cost-only", "--model", "llama3-8b", "--prompt-tokens", "8", "--prompt", "hi"], "give --prompt-tokens N instead"),
        (["--cost-only", "--model", "llama3-8b", "--prompt-tokens", "8", "--transport", "ray"], "--transport does not apply"),
        (["--cost-only", "--model", "llama3-8b", "--prompt-tokens", "8", "--mesh", "360x420"], "regions are square"),
        (["--cost-only", "--model", "llama9", "--prompt-tokens", "8"], "unknown model preset 'llama9'"),
        (["--cost-only", "--model", "llama2-13b", "--prompt-tokens", "4096", "--max-new-tokens", "2"],
         "make 4097 positions; llama2-13b's context is 4096"),
        (["--cost-only", "--model", "llama3-8b", "--prompt-tokens", "8", "--heatmap", "h.png"], "--heatmap does not apply"),
        (["--prompt", "hi", "--prompt-tokens", "8"], "--prompt-tokens is for --cost-only runs"),
        (["--max-new-tokens", "2"], "give the prompt"),
    ],
)
def test_bad_cost_only_requests_are_refused_in_one_line(args, message, capsys):
    assert main(["generate", *args]) == 2
    assert message in capsys.readouterr().err
