"""Converted checkpoints (``wafer-llm convert``): each tile reads its own shard, and the run is
exactly the run of the checkpoint it came from; a checkpoint made for another placement, or a
damaged shard, is refused with a message naming what is wrong."""

from __future__ import annotations

import dataclasses
import json
import zlib

import numpy as np
import pytest

from llm import cli
from llm.checkpoint import LlamaWeights, random_weights
from llm.config import LlamaConfig
from llm.converted import Converted, ConvertedMismatch, convert
from llm.engine import WaferLlama
from llm.errors import CheckpointError
from llm.models import load_model
from wafer_actors import Spec, Wafer, shards
from wafer_actors.device import preset
from wafer_actors.errors import InvalidArgument
from wafer_actors.shards import ShardError

from ..helpers import reference_greedy

WSE2 = preset("wse2")
SMALL = LlamaConfig("llama-shaped", 4, 64, 160, 8, 2, 8, 200, 500000.0, 1e-5, 2048)  # GQA, Llama-3's RoPE base
MAIN_MESH = (120, 120)  # where the README's main job places the default model
TOKENS = [1, 42, 7, 150]


@pytest.fixture(scope="module")
def smollm2_converted(tmp_path_factory, smollm2):
    """The default model converted by the command line for tiles 1x1 and 2x2 at the main job's mesh."""
    out = {}
    for tiles in ("1x1", "2x2"):
        path = tmp_path_factory.mktemp("converted") / tiles
        assert cli.main(["convert", "smollm2-135m", str(path), "--tiles", tiles, "--mesh", "120x120"]) == 0
        out[tiles] = path
    return out


@pytest.fixture(scope="module")
def gguf_run(smollm2):
    """Logits and cycles of decoding TOKENS from the GGUF's weights in memory (tiles 1x1, in-process)."""
    cfg, w, _ = smollm2
    with WaferLlama(cfg, w, mesh=MAIN_MESH, transport="local", tokens=len(TOKENS)) as m:
        return [m.step(t) for t in TOKENS]


def decode(m: WaferLlama) -> list:
    return [m.step(t) for t in TOKENS]


def assert_same_run(got, want):
    for (logits, st), (ref, ref_st) in zip(got, want):
        np.testing.assert_array_equal(logits, ref)
        assert st.cycles == ref_st.cycles


@pytest.mark.parametrize("tiles", ["1x1", "2x2"])
def test_a_converted_default_model_decodes_exactly_like_the_gguf_in_process(smollm2_converted, gguf_run, tiles):
    with WaferLlama.from_converted(smollm2_converted[tiles], transport="local", tokens=len(TOKENS)) as m:
        assert m.tiles == tuple(int(t) for t in tiles.split("x")) and m.mesh == MAIN_MESH  # the conversion's
        assert_same_run(decode(m), gguf_run)


@pytest.mark.parametrize("tiles", ["1x1", "2x2"])
def test_a_converted_default_model_decodes_exactly_like_the_gguf_on_ray(ray_local, smollm2_converted, gguf_run, tiles):
    with WaferLlama.from_converted(smollm2_converted[tiles], transport="ray", tokens=len(TOKENS)) as m:
        assert_same_run(decode(m), gguf_run)


def test_generate_runs_a_converted_model_and_its_tokenizer_travels(smollm2_converted, smollm2, tokenizer, tmp_path, capsys):
    conv = Converted(smollm2_converted["1x1"])
    tok = conv.tokenizer()
    text = tokenizer.chat("What is the capital of France?")
    assert tok.chat("What is the capital of France?") == text
    assert tok.encode(text) == tokenizer.encode(text) and tok.encode_prompt("Hi") == tokenizer.encode_prompt("Hi")
    assert (tok.bos_id, tok.eos_id) == (tokenizer.bos_id, tokenizer.eos_id)
    report = tmp_path / "run.json"
    assert cli.main(["generate", "--model", str(smollm2_converted["1x1"]), "--prompt", "The capital of France is",
                     "--max-new-tokens", "3", "--transport", "local", "--prefill", "mesh", "--json", str(report)]) == 0
    out = json.loads(report.read_text())
    cfg, w, _ = smollm2
    assert out["output_ids"] == reference_greedy(cfg, w, out["prompt_ids"], 3)
    assert out["predicted"]["regions"] == 1


def test_a_placement_other_than_the_conversions_is_refused(smollm2_converted):
    path = smollm2_converted["2x2"]
    asks = [dict(mesh=(128, 128)), dict(tiles=(1, 1)), dict(device="wse3"), dict(device=WSE2.replace(beta=1.0)),
            dict(dtype="float16"), dict(tokens=3000)]
    for ask in asks:
        with pytest.raises(ConvertedMismatch, match=f"{path} was converted for mesh 120x120, 1 region.*tiles 2x2, "
                                                    "device wse2, float32; this run asks for"):
            WaferLlama.from_converted(path, transport="local", **ask)
    code = cli.main(["generate", "--model", str(path), "--prompt", "Hi", "--mesh", "128x128", "--transport", "local"])
    assert code == 2


def test_scale_refuses_to_decode_a_converted_checkpoint_it_cannot_check(smollm2_converted, capsys):
    """Scaling checks every point's tokens against the NumPy reference, which a converted checkpoint (its weights in
    the tiles' shards) cannot feed: refused by name, pointing at what to give instead."""
    path = smollm2_converted["1x1"]
    assert cli.main(["scale", "--workload", "decode", "--model", str(path), "--nodes-or-tiles", "1"]) == 2
    assert f"{path} is a converted checkpoint" in capsys.readouterr().err


def random_converted(tmp_path, cfg, *, mesh, tiles, regions=1, dtype="float32", seed=3):
    w = random_weights(cfg, seed=seed)
    path = tmp_path / f"{cfg.name}-{dtype}"
    convert(cfg, w, None, path, mesh=mesh, device=WSE2, tiles=tiles, regions=regions, tokens=8, dtype=dtype)
    return w, path


def test_a_random_llama_shaped_model_round_trips_at_a_larger_mesh(tmp_path):
    """Every weight buffer the tiles read from their shards is the one the in-memory path places, and so is the run."""
    w, path = random_converted(tmp_path, SMALL, mesh=(136, 136), tiles=(2, 2))
    with WaferLlama(SMALL, w, mesh=(136, 136), tiles=(2, 2), transport="local", tokens=8) as ref, \
            WaferLlama.from_converted(path, transport="local", tokens=8) as m:
        for name in ("wqkv", "wo", "w13", "w2", "attn_norm", "lm_head"):
            np.testing.assert_array_equal(m.wafer.blocks(name), ref.wafer.blocks(name), err_msg=name)
        assert_same_run(decode(m), decode(ref))


def test_uneven_tiles_several_regions_and_float16_files(tmp_path):
    """Tiles 1x3 of an 8x8 mesh (uneven), two regions; float16 files decode as the weights rounded to float16."""
    w, path = random_converted(tmp_path, SMALL, mesh=(8, 8), tiles=(1, 3), regions=2)
    _, half = random_converted(tmp_path, SMALL, mesh=(8, 8), tiles=(1, 3), regions=2, dtype="float16")
    rounded = LlamaWeights(**{f.name: getattr(w, f.name).astype(np.float16).astype(np.float32)
                              for f in dataclasses.fields(w) if getattr(w, f.name) is not None})
    for weights, conv in ((w, path), (rounded, half)):
        with WaferLlama(SMALL, weights, mesh=(8, 8), tiles=(1, 3), regions=2, transport="local", tokens=8) as ref, \
                WaferLlama.from_converted(conv, transport="local", tokens=8) as m:
            assert len(m.wafer.regions) == 2
            assert_same_run(decode(m), decode(ref))
    assert sum(f.stat().st_size for f in half.rglob("*.bin")) < 0.6 * sum(f.stat().st_size for f in path.rglob("*.bin"))


def test_a_damaged_shard_is_refused_naming_the_file_and_chunk(tmp_path):
    _, path = random_converted(tmp_path, SMALL, mesh=(8, 8), tiles=(1, 2))
    index = json.loads((path / "index.json").read_text())
    shard = path / index["regions"][0]["tiles"][1]["file"]
    w2 = next(c for c in index["regions"][0]["tiles"][1]["chunks"] if c["name"] == "w2")
    data = bytearray(shard.read_bytes())
    data[w2["offset"] + 5] ^= 0x10
    shard.write_bytes(data)
    with pytest.raises(ShardError, match=f"{shard}: chunk 'w2' .* is corrupted: CRC-32"):
        WaferLlama.from_converted(path, transport="local", tokens=8)
    shard.write_bytes(data[: w2["offset"] + 100])
    with pytest.raises(ShardError, match=f"{shard} is truncated: it ends at byte {w2['offset'] + 100:,}, inside chunk 'w2'"):
        WaferLlama.from_converted(path, transport="local", tokens=8)
    shard.unlink()
    with pytest.raises(ShardError, match="no such shard file .*same path on every node"):
        WaferLlama.from_converted(path, transport="local", tokens=8)
    (path / "index.json").unlink()
    with pytest.raises(CheckpointError, match="conversion did not finish"):
        load_model(str(path))


def test_convert_refuses_a_directory_that_is_not_empty(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(InvalidArgument, match="exists and is not an empty directory"):
        convert(SMALL, random_weights(SMALL), None, tmp_path, mesh=(8, 8), device=WSE2)
    assert cli.main(["convert", "smollm2-135m", str(tmp_path)]) == 2
    assert cli.main(["convert", "smollm2-135m", str(tmp_path / "new"), "--tokens", "0"]) == 2


def test_a_chunk_reads_back_in_pieces_checked_against_zlib(tmp_path, monkeypatch):
    """A stacked buffer is written one layer after the other and reads back into a tile's stacked buffer in several
    pieces (the checksum thread and the reads interleaved); its CRC is zlib's of the bytes in the file."""
    monkeypatch.setattr(shards, "PIECE", 1000)
    rng = np.random.default_rng(0)
    entries = [rng.standard_normal((2, 3, 7, 5)).astype(np.float32) for _ in range(4)]  # 4 layers of [h, w, 7, 5]
    with open(tmp_path / "t.bin", "wb") as f:
        f.write(b"x")  # the chunk starts at the next aligned offset
        chunk = shards.write_chunk(f, "w", np.stack(entries, axis=2), True, "float32")  # blocks [h, w, 4, 7, 5]
    assert chunk.offset == shards.ALIGN and chunk.nbytes == 4 * entries[0].nbytes
    raw = (tmp_path / "t.bin").read_bytes()[chunk.offset :]
    assert chunk.crc32 == zlib.crc32(raw) and raw == b"".join(e.tobytes() for e in entries)
    with Wafer((2, 3), transport="local") as wafer:
        wafer.load_chunks("w", (4, 14, 15), Spec(None, "y", "x"), [(str(tmp_path / "t.bin"), chunk)])
        np.testing.assert_array_equal(wafer.blocks("w"), np.stack(entries, axis=2))
