"""MBU and MFU (MoE-CAP's definitions) against hand computations."""

from __future__ import annotations

import json

import pytest

from llm.cli import main
from llm.config import LlamaConfig, preset
from llm.utilisation import decode_work, generation_utilisation, prefill_work
from wafer_actors.device import DeviceSpec
from wafer_actors.device import preset as device_preset
from wafer_actors.utilisation import Work, utilisation

TINY = LlamaConfig("tiny", 3, 48, 80, 6, 2, 8, 100)  # q width 48, K/V width 16
SMALL_DEVICE = DeviceSpec("small", 10, 10, 48 * 1024, 1e9, {"float32": 1.0}, 4.0, 1.0, 10.0, 24, 100.0)


def test_decode_and_prefill_work_by_hand():
    # per layer: q, k, v 48 x (48 + 16 + 16) = 3,840; o 48 x 48 = 2,304; FFN 3 x 48 x 80 = 11,520 -> 17,664
    # 3 layers 52,992 + LM head 48 x 100 = 4,800 -> 57,792 multiply-add weights; norms 3 x 2 x 48 + 48 = 336
    # context 10: K and V read 2 x 3 layers x 16 x 10 = 960; attention 2 x 3 x 48 x 10 = 2,880 multiply-adds
    assert decode_work(TINY, 10, 4) == Work(bytes=4 * (57_792 + 336 + 960), flops=2 * (57_792 + 2_880))
    # a 4-token prompt: 10 causal (query, key) pairs; K and V of 4 tokens 2 x 3 x 16 x 4 = 384
    assert prefill_work(TINY, 4, 2) == Work(bytes=2 * (57_792 + 336 + 384), flops=2 * (4 * 57_792 + 2 * 3 * 48 * 10))


def test_llama3_8b_decode_reads_its_weights_and_cache():
    # 32 layers x (4096 x 6144 + 4096 x 4096 + 3 x 4096 x 14336) + 4096 x 128256 = 7,504,658,432 weights,
    # norms 266,240, KV at 4K context 2 x 32 x 1024 x 4096 = 268,435,456; float16
    assert decode_work(preset("llama3-8b"), 4096, 2).bytes == 2 * (7_504_658_432 + 266_240 + 268_435_456)


def test_utilisation_by_hand():
    # 100 cores x 16 B x 1 GHz = 1.6 TB/s; 100 x 2 FLOPs x 1 GHz = 200 GFLOP/s; half the cores in use
    u = utilisation(Work(bytes=236_352, flops=121_344), 1e-6, SMALL_DEVICE, "float32", 50)
    assert u["mbu"] == pytest.approx(236_352 / 1.6e6) and u["mfu"] == pytest.approx(121_344 / 2e5)
    assert u["mbu_cores_used"] == pytest.approx(2 * u["mbu"]) and u["mfu_cores_used"] == pytest.approx(2 * u["mfu"])


def test_the_wse2_bandwidth_is_the_published_one():
    """16 B read per core per cycle; with the 8 B write, on 850,000 cores at 1.1 GHz, that is the 22 PB/s quoted for WSE-2."""
    d = device_preset("wse2")
    quoted = d.sram_bandwidth() * 24 / 16 * 850_000 / d.cores
    assert quoted == pytest.approx(22e15, rel=0.03)
    assert d.peak_flops("float16") == 2 * d.peak_flops("float32")


def test_a_generation_reports_both_phases():
    """Token-by-token prompt of 3 tokens then 2 decode steps: the phases' work adds up the steps' contexts."""
    d = device_preset("wse2")
    u = generation_utilisation(TINY, d, "float32", 64, 3, "token", 3e4, 2, 2e4)
    prompt = decode_work(TINY, 1, 4) + decode_work(TINY, 2, 4) + decode_work(TINY, 3, 4)
    assert u["prefill"]["bytes"] == prompt.bytes and u["prefill"]["flops"] == prompt.flops
    assert u["decode"]["flops"] == (decode_work(TINY, 4, 4) + decode_work(TINY, 5, 4)).flops
    assert u["decode"]["mbu"] == pytest.approx(u["decode"]["bytes"] / (2e4 / d.clock_hz * d.sram_bandwidth()))


def test_bench_reports_utilisation(tmp_path):
    """A 64 x 64 float32 GEMV on 8 x 8 cores: the matrix and vector read once, 2 FLOPs per multiply-add."""
    bench = tmp_path / "gemv.json"
    assert main(["bench", "gemv", "--P", "8", "--M", "64", "--N", "64", "--algo", "meshgemv", "--dtype", "float32",
                 "--json", str(bench)]) == 0
    row = json.loads(bench.read_text())
    seconds = row["predicted_us"] / 1e6
    assert row["mbu_cores_used"] == pytest.approx(4 * (64 * 64 + 64) / (seconds * 16 * 64 * 1.1e9))
    assert row["mfu_cores_used"] == pytest.approx(2 * 64 * 64 / (seconds * 2 * 64 * 1.1e9))
