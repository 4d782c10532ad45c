import re

import numpy as np
import pytest

from llm.checkpoint import GGUFRows, default_model_path, load_gguf, random_weights
from llm.config import PRESETS, LlamaConfig, preset
from llm.errors import CheckpointError


def write_gguf(path, arch="llama", wrong=None, extra=None):
    """A tiny Llama GGUF written with the gguf package: 2 layers, dim 8, vocab 16; ``extra(writer)`` adds more."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    if extra:
        extra(w)
    w.add_block_count(2)
    w.add_embedding_length(8)
    w.add_feed_forward_length(12)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_context_length(64)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(16)])
    rng = np.random.default_rng(0)

    def mat(out, inp):  # GGUF keeps (out, in) in numpy order
        return rng.standard_normal((out, inp)).astype(np.float32)

    w.add_tensor("token_embd.weight", mat(16, 8))
    for i in range(2):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(8, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", mat(8, 8))
        w.add_tensor(f"blk.{i}.attn_k.weight", mat(4, 8) if wrong != f"blk.{i}.attn_k.weight" else mat(5, 8))
        w.add_tensor(f"blk.{i}.attn_v.weight", mat(4, 8))
        w.add_tensor(f"blk.{i}.attn_output.weight", mat(8, 8))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(8, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", mat(12, 8))
        w.add_tensor(f"blk.{i}.ffn_up.weight", mat(12, 8))
        w.add_tensor(f"blk.{i}.ffn_down.weight", mat(8, 12))
    w.add_tensor("output_norm.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_default_model_loads_with_its_real_shapes(smollm2):
    """The default GGUF gives SmolLM2-135M's shapes, tied embeddings and ~135 M parameters."""
    cfg, w, _ = smollm2
    ref = preset("smollm2-135m")
    assert (cfg.n_layers, cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (30, 576, 1536, 9, 3, 49152)
    assert cfg.tied_embeddings and np.shares_memory(w.lm_head, w.tok_embeddings)
    assert w.wk.shape == (30, 576, 192) and w.w_down.shape == (30, 1536, 576)
    assert 134e6 < ref.n_params() < 136e6
    assert np.isfinite(w.wq).all() and 0.01 < np.abs(w.wq).mean() < 1


def test_token_rows_read_from_the_file_are_the_tables_bit_for_bit(smollm2):
    """The host's lookup of a GGUF's embeddings (rows dequantized as read) gives the loaded table's rows, the
    quantized default model's."""
    _, w, _ = smollm2
    rows, ids = GGUFRows(default_model_path()), [0, 49151, 7, 7, 30000]
    assert np.array_equal(rows[ids].view(np.uint32), w.tok_embeddings[ids].view(np.uint32))
    assert np.array_equal(rows[123].view(np.uint32), w.tok_embeddings[123].view(np.uint32))
    assert rows[np.array([5])].shape == (1, 576) and rows[5].shape == (576,)


def test_tiny_gguf_round_trips_every_tensor(tmp_path):
    """A file written with gguf's writer reads back in x @ W orientation, value for value."""
    import gguf

    path = write_gguf(tmp_path / "tiny.gguf")
    cfg, w, reader = load_gguf(path)
    assert (cfg.n_layers, cfg.dim, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size) == (2, 8, 1, 4, 16)
    stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    np.testing.assert_array_equal(w.wq[1], stored["blk.1.attn_q.weight"].T)
    np.testing.assert_array_equal(w.w_down[0], stored["blk.0.ffn_down.weight"].T)
    np.testing.assert_array_equal(w.tok_embeddings, stored["token_embd.weight"])
    np.testing.assert_array_equal(GGUFRows(path)[[3, 15]], stored["token_embd.weight"][[3, 15]])


def test_token_rows_of_a_file_rewritten_since_it_was_loaded_are_its_new_rows(tmp_path):
    """``GGUFRows`` reuses the embeddings ``load_gguf`` found, unless the file changed (here its tensors moved)."""
    import gguf

    path = write_gguf(tmp_path / "tiny.gguf")
    load_gguf(path)
    write_gguf(path, extra=lambda w: w.add_string("general.name", "x" * 1000))
    stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    np.testing.assert_array_equal(GGUFRows(path)[[3, 15]], stored["token_embd.weight"][[3, 15]])


def test_bad_checkpoints_name_the_file_and_tensor(tmp_path):
    """A wrong architecture, a wrong shape and a missing file are clear errors."""
    with pytest.raises(CheckpointError, match=r"architecture 'gpt2' is not supported"):
        load_gguf(write_gguf(tmp_path / "gpt2.gguf", arch="gpt2"))
    with pytest.raises(CheckpointError, match=r"bad.gguf: tensor 'blk.1.attn_k.weight' has shape \(8, 5\), expected \(8, 4\)"):
        load_gguf(write_gguf(tmp_path / "bad.gguf", wrong="blk.1.attn_k.weight"))
    with pytest.raises(CheckpointError, match=r"cannot read GGUF file"):
        load_gguf(tmp_path / "missing.gguf")


def test_presets_and_random_weights():
    """Every preset is valid; random weights have the preset's shapes and are reproducible."""
    assert set(PRESETS) == {"smollm2-135m", "llama3-8b", "llama2-13b", "codellama-34b", "qwen2-72b"}
    assert 7.9e9 < preset("llama3-8b").n_params() < 8.1e9
    tiny = LlamaConfig("tiny", 2, 16, 32, 4, 2, 4, 50)
    a, b = random_weights(tiny, seed=3), random_weights(tiny, seed=3)
    assert a.wk.shape == (2, 16, 8)
    np.testing.assert_array_equal(a.w_up, b.w_up)
    with pytest.raises(ValueError, match=r"unknown model preset 'llama9'"):
        preset("llama9")
    with pytest.raises(ValueError, match=r"n_heads 4 is not a multiple of n_kv_heads 3"):
        LlamaConfig("bad", 2, 16, 32, 4, 3, 4, 50)


@pytest.mark.parametrize("feature, extra", [
    ("llama.rope.scaling.type: RoPE scaling of type 'yarn'", lambda w: w.add_string("llama.rope.scaling.type", "yarn")),
    ("llama.attention.key_length 6 and value_length 4 differ",
     lambda w: (w.add_uint32("llama.attention.key_length", 6), w.add_uint32("llama.attention.value_length", 4))),
    ("llama.expert_count 8", lambda w: w.add_uint32("llama.expert_count", 8)),
    ("bias tensors (blk.0.attn_output.bias", lambda w: w.add_tensor("blk.0.attn_output.bias", np.zeros(8, np.float32))),
    ("q, k, v bias tensors on some layers only", lambda w: w.add_tensor("blk.0.attn_q.bias", np.zeros(8, np.float32))),
])
def test_gguf_features_we_do_not_compute_are_refused(tmp_path, feature, extra):
    """A file that needs another RoPE scaling, key and value head sizes that differ, experts or biases other than
    every layer's q, k, v is refused by name, not run wrong."""
    with pytest.raises(CheckpointError, match=re.escape(feature)):
        load_gguf(write_gguf(tmp_path / "m.gguf", extra=extra))
