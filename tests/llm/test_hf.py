"""A Hugging Face checkpoint written here (random weights, GQA, sharded with an index, RoPE in
the rotate-half layout) loads to the same weights and decodes like the reference."""

from __future__ import annotations

import json
import re

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from llm.checkpoint import random_weights
from llm.config import LlamaConfig
from llm.engine import WaferLlama
from llm.errors import CheckpointError
from llm.hf import load_hf
from llm.models import load_model
from llm.reference import ReferenceModel

CFG = LlamaConfig("hf-tiny", 2, 32, 64, 4, 2, 8, 90, 10000.0, 1e-6, 512)


def to_half_split(w: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
    """(in, out) columns from adjacent RoPE pairs to Hugging Face's rotate-half order."""
    half = head_dim // 2
    cols = w.reshape(w.shape[0], heads, half, 2)
    return np.concatenate([cols[..., 0], cols[..., 1]], axis=2).reshape(w.shape)


def write_hf(path, cfg, w, shards=2):
    hf = {"model.embed_tokens.weight": w.tok_embeddings, "model.norm.weight": w.final_norm, "lm_head.weight": w.lm_head.T}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        hf[p + "input_layernorm.weight"] = w.attn_norm[i]
        hf[p + "post_attention_layernorm.weight"] = w.ffn_norm[i]
        hf[p + "self_attn.q_proj.weight"] = to_half_split(w.wq[i], cfg.n_heads, cfg.head_dim).T
        hf[p + "self_attn.k_proj.weight"] = to_half_split(w.wk[i], cfg.n_kv_heads, cfg.head_dim).T
        hf[p + "self_attn.v_proj.weight"] = w.wv[i].T
        hf[p + "self_attn.o_proj.weight"] = w.wo[i].T
        hf[p + "mlp.gate_proj.weight"] = w.w_gate[i].T
        hf[p + "mlp.up_proj.weight"] = w.w_up[i].T
        hf[p + "mlp.down_proj.weight"] = w.w_down[i].T
    names = sorted(hf)
    weight_map = {}
    for s in range(shards):
        part = {n: np.ascontiguousarray(hf[n], dtype=np.float32) for n in names[s::shards]}
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(path / fname))
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size, "rope_theta": cfg.rope_base, "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": False,
    }))


def test_hf_checkpoint_loads_and_decodes_like_the_reference(tmp_path):
    w = random_weights(CFG, seed=7)
    write_hf(tmp_path, CFG, w)
    cfg, loaded = load_hf(tmp_path)
    assert (cfg.n_layers, cfg.dim, cfg.n_kv_heads, cfg.head_dim) == (2, 32, 2, 8)
    np.testing.assert_array_equal(loaded.wq, w.wq)  # the rotate-half permutation is undone exactly
    np.testing.assert_array_equal(loaded.wk, w.wk)
    np.testing.assert_array_equal(loaded.lm_head, w.lm_head)
    ref = ReferenceModel(CFG, w, 12)
    with WaferLlama(cfg, loaded, mesh=(4, 4), tiles=(2, 2), transport="local", tokens=12) as m:
        tok = 5
        for pos in range(12):
            want = ref.forward(tok, pos)
            got, _ = m.step(tok)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
            tok = int(np.argmax(want))
            assert int(np.argmax(got)) == tok


def test_hf_rotate_half_matches_hf_rope(tmp_path):
    """Independent check of the permutation: Hugging Face's rotate-half RoPE on the file's q
    gives the adjacent-pair RoPE on the loaded q, up to the same column order."""
    from llm.checkpoint import rope_interleave
    from llm.reference import rope

    rng = np.random.default_rng(0)
    q_hf = rng.standard_normal((CFG.n_heads, CFG.head_dim)).astype(np.float32)
    pos, hd = 7, CFG.head_dim
    inv = CFG.rope_base ** (-np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(pos * inv), np.sin(pos * inv)
    x1, x2 = q_hf[:, : hd // 2], q_hf[:, hd // 2 :]
    rotated_hf = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=1)
    perm = rope_interleave(CFG.n_heads, hd)
    ours = rope(q_hf.ravel()[perm].reshape(CFG.n_heads, hd), pos, CFG.rope_freqs())
    np.testing.assert_allclose(ours.ravel(), rotated_hf.ravel()[perm], rtol=1e-5, atol=1e-6)


def test_truncated_or_missing_checkpoints_are_refused(tmp_path):
    w = random_weights(CFG, seed=7)
    write_hf(tmp_path, CFG, w, shards=1)
    shard = next(tmp_path.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="key 'num_attention_heads' is missing"):
        load_hf(tmp_path)
    with pytest.raises(CheckpointError, match="unknown model 'no-such-model'"):
        load_model("no-such-model")
    with pytest.raises(CheckpointError, match="shape preset without weights"):
        load_model("llama3-8b")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(CheckpointError, match="cannot read GGUF file"):
        load_model(str(bad))


def test_truncated_gguf_is_refused(tmp_path):
    from llm.checkpoint import default_model_path

    cut = tmp_path / "cut.gguf"
    with open(default_model_path(), "rb") as f:
        cut.write_bytes(f.read(5_000_000))
    with pytest.raises(CheckpointError, match=r"cut.gguf is truncated: 5,000,000 bytes, but its header places data up to byte"):
        load_model(str(cut))


def test_tokenizer_json_matches_the_gguf_tokenizer(tmp_path, tokenizer):
    from llm.tokenizer import Tokenizer

    tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "chat_template": tokenizer.chat_template}))
    hf = Tokenizer.from_hf(tmp_path)
    text = "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>"
    assert hf.encode(text) == tokenizer.encode(text)
    assert hf.encode("<|im_start|>")[0] == hf.bos_id and len(hf.encode("<|im_start|>")) == 1
    assert hf.eos_id == tokenizer.eos_id
    assert hf.chat("hi") == tokenizer.chat("hi")


def test_bf16_safetensors_widen_exactly(tmp_path):
    """A bfloat16 checkpoint (as most are published) loads to the float32 values its bits encode: each element's
    16 bits become the high half of a float32, checked by bit arithmetic, not by the library that reads it."""
    w = random_weights(CFG, seed=3)
    write_hf(tmp_path, CFG, w, shards=1)
    shard = next(tmp_path.glob("*.safetensors"))
    tensors = load_file(str(shard))
    bf16 = {name: a.astype(ml_dtypes.bfloat16) for name, a in tensors.items()}
    save_file(bf16, str(shard))
    bits = {name: a.view(np.uint16) for name, a in bf16.items()}
    widened = {name: (b.astype(np.uint32) << 16).view(np.float32) for name, b in bits.items()}
    _, loaded = load_hf(tmp_path)
    np.testing.assert_array_equal(loaded.tok_embeddings, widened["model.embed_tokens.weight"])
    np.testing.assert_array_equal(loaded.w_down[1], widened["model.layers.1.mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(loaded.lm_head, widened["lm_head.weight"].T)
    assert not np.array_equal(loaded.lm_head, w.lm_head)  # the values really went through bfloat16


@pytest.mark.parametrize("key, value, named", [
    ("model_type", "mistral", "model_type 'mistral'"),
    ("rope_scaling", {"rope_type": "longrope", "factor": 8.0}, "rope_scaling of type 'longrope'"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e6}, "rope_parameters of type 'yarn'"),
    ("attention_bias", True, "attention_bias True"),
    ("mlp_bias", True, "mlp_bias True"),
    ("num_local_experts", 8, "a mixture of experts"),
    ("use_sliding_window", True, "sliding_window"),
])
def test_hf_features_we_do_not_compute_are_refused(tmp_path, key, value, named):
    """A config that asks for another architecture, RoPE scaling, biases or experts is refused by name."""
    write_hf(tmp_path, CFG, random_weights(CFG, seed=1), shards=1)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(CheckpointError, match=re.escape(named) + ".* is not supported"):
        load_hf(tmp_path)


def test_hf_rope_theta_is_read_from_either_style(tmp_path):
    """transformers 5 writes rope_parameters {rope_type, rope_theta}; older files write rope_theta."""
    write_hf(tmp_path, CFG, random_weights(CFG, seed=1), shards=1)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_theta"]
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}))
    assert load_hf(tmp_path)[0].rope_base == 5e5
