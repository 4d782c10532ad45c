"""Llama-3 and Qwen2 style checkpoints written here (random weights, two layers, a vocabulary of a few
hundred tokens), as GGUF files and Hugging Face directories, against independent references:

- tokenization: ``tiktoken`` (the BPE library Llama 3's and Qwen's own tokenizers are built on), given
  the same ranks and the published split pattern of each model; ``sentencepiece`` (Llama 2's and
  TinyLlama's tokenizer library) for a model it trains here;
- numbers: a forward pass written in this file in Hugging Face's conventions (weights (out, in),
  rotate-half RoPE, Llama 3.1's frequency rule, biases, repeated K/V heads), float64, the whole
  sequence at once: none of the package's layouts, loaders or kernels.
"""

from __future__ import annotations

import json
from collections import Counter

import gguf
import ml_dtypes
import numpy as np
import pytest
import tiktoken
from safetensors.numpy import save_file

from llm.engine import WaferLlama
from llm.generate import generate
from llm.models import load_model

# Split patterns as the models' own tokenizers publish them
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                  r"|\s+(?!\S)|\s+")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
QWEN2_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = ("The capital of France is Paris. The capital of Italy is Rome; the capital of Japan is Tokyo. "
          "I'm sure you'll see it's there: we're told they'd go and we've been. 1234 + 5678 = 6912. "
          "Numbers like 3.14159 and 2,718 appear in texts, and so do words like naïve café and 日本語.\n\n"
          "def main():\n    return 42\n") * 3
TRICKY = [
    "Hello world", "The capital of France is", "  two leading spaces", "trailing spaces   ", "tabs\tand\nnew\n\nlines\r\n",
    "digits 1234567 and 3.14159 and 2,718,281", "I'm, you'll, it's, WE'RE, they'D", "unicode: café naïve 日本語 Ωμέγα 🤖",
    "mixed123abc456", "punctuation!!! ... ??? --- ((x))", "    indented code():\n        return 1",
]


def byte_chars() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as a printable character (what GGUF and tokenizer.json store)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def train_ranks(merges: int = 150) -> dict[bytes, int]:
    """A tiny byte-level BPE vocabulary: the 256 bytes, then the most frequent pair of each round (tiktoken's ranks)."""
    words = [[bytes([b]) for b in w.encode()] for w in CORPUS.replace("\n", " \n ").split(" ") if w]
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(merges):
        pairs = Counter(p for w in words for p in zip(w, w[1:]) if p[0] + p[1] not in ranks)
        if not pairs:
            break
        (a, b), _n = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == (a, b):
                    w[i : i + 2] = [a + b]
                i += 1
    return ranks


RANKS = train_ranks()


def bpe_tables(special: list[str]) -> tuple[list[str], list[tuple[str, str]], list[int]]:
    """The vocabulary as a GGUF file stores it: byte-level tokens (id = rank, then the special tokens), merges
    (every split of a token into two tokens, by the rank of the token: tiktoken's rule as a merge list), types."""
    chars = byte_chars()
    text = {r: "".join(chars[b] for b in tok) for tok, r in RANKS.items()}
    tokens = [text[i] for i in range(len(RANKS))] + special
    merges = []
    for tok, r in sorted(RANKS.items(), key=lambda kv: kv[1]):
        splits = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in RANKS and tok[i:] in RANKS]
        merges += [(text[RANKS[a]], text[RANKS[b]]) for a, b in sorted(splits, key=lambda s: (RANKS[s[0]], RANKS[s[1]]))]
    return tokens, merges, [1] * len(RANKS) + [3] * len(special)


def reference_tokenizer(pattern: str, special: list[str]) -> tiktoken.Encoding:
    return tiktoken.Encoding("test", pat_str=pattern, mergeable_ranks=RANKS,
                             special_tokens={s: len(RANKS) + i for i, s in enumerate(special)})


VOCAB = len(RANKS) + 3
LLAMA3 = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 48,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,  # 4 x 16 != 32
          "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "max_position_embeddings": 256, "tie_word_embeddings": False,
          "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
          "bos_token_id": len(RANKS), "eos_token_id": [len(RANKS) + 1, len(RANKS) + 2]}
QWEN2 = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 32, "intermediate_size": 40,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
         "rms_norm_eps": 1e-6, "max_position_embeddings": 256, "tie_word_embeddings": True, "rope_theta": 1000000.0,
         "use_sliding_window": False, "sliding_window": 4096, "eos_token_id": len(RANKS)}


def hf_state(c: dict, seed: int) -> dict[str, np.ndarray]:
    """Random weights under Hugging Face's names, (out, in), float32; q, k, v biases for Qwen2."""
    rng = np.random.default_rng(seed)
    d, f, hd = c["hidden_size"], c["intermediate_size"], c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd

    def mat(o, i):
        return (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)

    sd = {"model.embed_tokens.weight": (rng.standard_normal((c["vocab_size"], d)) * 0.5).astype(np.float32),
          "model.norm.weight": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)}
    if not c["tie_word_embeddings"]:
        sd["lm_head.weight"] = mat(c["vocab_size"], d)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32),
                   p + "post_attention_layernorm.weight": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32),
                   p + "self_attn.q_proj.weight": mat(q, d), p + "self_attn.k_proj.weight": mat(kv, d),
                   p + "self_attn.v_proj.weight": mat(kv, d), p + "self_attn.o_proj.weight": mat(d, q),
                   p + "mlp.gate_proj.weight": mat(f, d), p + "mlp.up_proj.weight": mat(f, d),
                   p + "mlp.down_proj.weight": mat(d, f)})
        if c["model_type"] == "qwen2":
            for name, n in (("q", q), ("k", kv), ("v", kv)):
                sd[p + f"self_attn.{name}_proj.bias"] = (0.5 * rng.standard_normal(n)).astype(np.float32)
    return sd


def inv_freq(c: dict) -> np.ndarray:
    """RoPE frequencies of one head, with Llama 3.1's rule where the config asks for it."""
    hd = c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])
    inv = c["rope_theta"] ** (-np.arange(0, hd, 2) / hd)
    s = c.get("rope_scaling") or c.get("rope_parameters") or {}
    if s.get("rope_type") == "linear":  # positions divided by the factor
        inv = inv / s["factor"]
    if s.get("rope_type") == "llama3":
        orig, lo, hi, factor = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"], s["factor"]
        wavelen = 2 * np.pi / inv
        smooth = (orig / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * inv / factor + smooth * inv
        inv = np.where(wavelen > orig / lo, inv / factor, np.where(wavelen < orig / hi, inv, blended))
    return inv


def hf_logits(c: dict, sd: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """Logits (T, vocab) of the whole sequence, causal, float64."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    H, KV = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim", c["hidden_size"] // H)
    T = len(ids)

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + c["rms_norm_eps"]) * w

    def rotate(x):  # (heads, T, hd): rotate-half RoPE
        ang = np.arange(T)[:, None] * inv_freq(c)[None]
        cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
        return x * cos + np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1) * sin

    x = sd["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, sd[p + "input_layernorm.weight"])
        proj = {n: h @ sd[p + f"self_attn.{n}_proj.weight"].T + sd.get(p + f"self_attn.{n}_proj.bias", 0) for n in "qkv"}
        q = rotate(proj["q"].reshape(T, H, hd).transpose(1, 0, 2))
        k = np.repeat(rotate(proj["k"].reshape(T, KV, hd).transpose(1, 0, 2)), H // KV, axis=0)
        v = np.repeat(proj["v"].reshape(T, KV, hd).transpose(1, 0, 2), H // KV, axis=0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + (a @ v).transpose(1, 0, 2).reshape(T, H * hd) @ sd[p + "self_attn.o_proj.weight"].T
        h = norm(x, sd[p + "post_attention_layernorm.weight"])
        g, u = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ sd[p + "mlp.down_proj.weight"].T
    head = sd["model.embed_tokens.weight"] if c["tie_word_embeddings"] else sd["lm_head.weight"]
    return norm(x, sd["model.norm.weight"]) @ head.T


def hf_greedy(c: dict, sd: dict[str, np.ndarray], prompt: list[int], new: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the logits that chose each of them."""
    ids, chosen = list(prompt), []
    for _ in range(new):
        logits = hf_logits(c, sd, ids)[-1]
        chosen.append(logits)
        ids.append(int(np.argmax(logits)))
    return ids[len(prompt) :], np.array(chosen)


def write_hf(path, c: dict, sd: dict[str, np.ndarray], dtype=np.float32):
    path.mkdir()
    save_file({k: v.astype(dtype) for k, v in sd.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(c))
    return path


def interleave_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows (outputs) of q or k from rotate-half to adjacent pairs, as llama.cpp's converter stores a Llama."""
    hd = w.shape[0] // heads
    order = (np.arange(heads)[:, None] * hd + np.stack([np.arange(hd // 2), np.arange(hd // 2) + hd // 2], 1).ravel()).ravel()
    return w[order]


def write_gguf(path, c: dict, sd: dict[str, np.ndarray], pre: str, special: list[str], extra=None):
    """The same model as a GGUF file: llama (q, k permuted, Llama 3.1's frequencies as rope_freqs.weight, as
    llama.cpp's converter writes them) or qwen2 (q, k as in the Hugging Face file, biases)."""
    arch = c["model_type"]
    H, KV = c["num_attention_heads"], c["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c["num_hidden_layers"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    if "head_dim" in c:
        w.add_key_length(c["head_dim"])
        w.add_value_length(c["head_dim"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_context_length(c["max_position_embeddings"])
    tokens, merges, types = bpe_tables(special)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    w.add_token_types(types)
    if extra:
        extra(w)
    permute = arch == "llama"
    if c.get("rope_scaling"):
        base = c["rope_theta"] ** (-np.arange(0, c["head_dim"], 2) / c["head_dim"])
        w.add_tensor("rope_freqs.weight", (base / inv_freq(c)).astype(np.float32))
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                 "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                 "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                 "mlp.down_proj.weight": "ffn_down.weight", "self_attn.q_proj.bias": "attn_q.bias",
                 "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias"}
    for name, a in sd.items():
        if name.startswith("model.layers."):
            i, rest = name.split(".", 3)[2:]
            if permute and rest.startswith("self_attn.q_proj"):
                a = interleave_rows(a, H)
            if permute and rest.startswith("self_attn.k_proj"):
                a = interleave_rows(a, KV)
            w.add_tensor(f"blk.{i}.{per_layer[rest]}", a)
        else:
            w.add_tensor(names[name], a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def wafer_greedy(model, prompt: list[int], new: int, prefill: str, tiles=(1, 1)):
    cfg, weights, _tok = load_model(str(model))
    with WaferLlama(cfg, weights, mesh=(4, 4), tiles=tiles, transport="local", tokens=len(prompt) + new,
                    prefill_tokens=len(prompt) if prefill == "mesh" else 0) as m:
        out = generate(m, prompt, max_new_tokens=new, prefill=prefill, keep_logits=True)
    return out.output_ids, np.array(out.logits)


def assert_same_run(got, want):
    (ids, logits), (ref_ids, ref_logits) = got, want
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4 * np.abs(ref_logits).max())
    assert ids == ref_ids


PROMPT = [5, 77, 300, 12, 150, 9, 260, 41]


@pytest.mark.parametrize("family, pre, pattern, special", [
    ("llama3", "llama-bpe", LLAMA3_PATTERN, LLAMA3_SPECIAL),
    ("qwen2", "qwen2", QWEN2_PATTERN, QWEN2_SPECIAL),
])
def test_gguf_tokenizers_give_the_reference_ids(tmp_path, family, pre, pattern, special):
    """Each pre-tokenizer splits and merges the tricky strings exactly as the reference tokenizer does."""
    c = LLAMA3 if family == "llama3" else QWEN2
    path = write_gguf(tmp_path / "m.gguf", c, hf_state(c, 0), pre, special)
    tok = load_model(str(path))[2]
    ref = reference_tokenizer(pattern, special)
    for text in TRICKY + [special[1] + "user text" + special[2] + "\n"]:
        assert tok.encode(text) == ref.encode(text, allowed_special="all"), text
        assert tok.decode(tok.encode(text)) == text
    digits = len(tok.encode("1234567"))  # Llama 3 merges digits within groups of three, Qwen2 keeps them one by one
    assert digits < 7 if family == "llama3" else digits == 7


def test_a_sentencepiece_gguf_gives_the_reference_ids(tmp_path):
    """Llama 2 / TinyLlama: a SentencePiece BPE model trained here, stored in a GGUF file the way llama.cpp's
    converter stores it (pieces, scores, types, byte tokens), tokenizes as SentencePiece does, characters it
    never saw as their bytes; a special token in the text is one id."""
    import sentencepiece as spm

    (tmp_path / "corpus.txt").write_text(CORPUS)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"), model_type="bpe",
                                   vocab_size=420, byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, character_coverage=1.0, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    kinds = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1 for i in range(sp.get_piece_size())]
    c = {**QWEN2, "model_type": "llama", "tie_word_embeddings": True, "vocab_size": sp.get_piece_size()}
    w = gguf.GGUFWriter(str(tmp_path / "tinyllama.gguf"), "llama")
    for key, value in (("block_count", 2), ("embedding_length", 32), ("feed_forward_length", 40), ("attention.head_count", 4),
                       ("attention.head_count_kv", 2), ("context_length", 64)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
    w.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
    w.add_token_types(kinds)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    for name, a in hf_state(c, 0).items():
        if "layers" not in name:
            w.add_tensor({"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}[name], a)
        else:
            i, rest = name.split(".", 3)[2:]
            part = {"input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
                    "self_attn.o_proj.weight": "attn_output", "mlp.gate_proj.weight": "ffn_gate",
                    "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down"}.get(rest, f"attn_{rest[10]}")
            w.add_tensor(f"blk.{i}.{part}.weight", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = load_model(str(tmp_path / "tinyllama.gguf"))[2]
    for text in TRICKY + [CORPUS]:
        assert tok.encode(text) == sp.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    assert any(k == 6 for k in (kinds[i] for i in tok.encode("日本語 🤖")))  # byte fallback used
    assert tok.encode("</s>hi") == [sp.eos_id()] + sp.encode("hi")  # after a special token, a space prefix again


def test_a_llama3_gguf_runs_as_the_reference(tmp_path):
    """GQA, a head size other than dim / heads (key_length), Llama 3.1's RoPE frequencies (rope_freqs.weight),
    BOS before a plain prompt, end of turn as a stop token: greedy tokens and logits equal the reference's,
    feeding the prompt token by token and prefilling it on the mesh."""
    sd = hf_state(LLAMA3, 1)
    bos, eos, eot = len(RANKS), len(RANKS) + 1, len(RANKS) + 2

    def ids(w):
        w.add_bos_token_id(bos)
        w.add_eos_token_id(eos)
        w.add_eot_token_id(eot)
        w.add_add_bos_token(True)

    path = write_gguf(tmp_path / "llama3.gguf", LLAMA3, sd, "llama-bpe", LLAMA3_SPECIAL, ids)
    cfg, _, tok = load_model(str(path))
    assert (cfg.head_dim, cfg.n_heads * cfg.head_dim, cfg.dim) == (16, 64, 32)
    np.testing.assert_allclose(cfg.rope_freqs(), inv_freq(LLAMA3), rtol=1e-6)
    assert tok.encode_prompt("Hello")[0] == bos and tok.encode("Hello")[0] != bos
    assert tok.stop_ids == {eos, eot}
    want = hf_greedy(LLAMA3, sd, PROMPT, 5)
    assert_same_run(wafer_greedy(path, PROMPT, 5, "token"), want)
    assert_same_run(wafer_greedy(path, PROMPT, 5, "mesh", tiles=(2, 2)), want)


@pytest.mark.parametrize("style", ["rope_scaling", "rope_parameters"])
def test_a_llama3_bf16_directory_runs_as_the_reference(tmp_path, style):
    """The same model as a Hugging Face directory in bfloat16, its RoPE scaling written either way transformers
    writes it: the reference runs on the bfloat16 values, widened by bit arithmetic."""
    c = dict(LLAMA3)
    if style == "rope_parameters":  # transformers 5
        c["rope_parameters"] = {**c.pop("rope_scaling"), "rope_theta": c.pop("rope_theta")}
    sd = hf_state(LLAMA3, 2)
    path = write_hf(tmp_path / "llama3", c, sd, ml_dtypes.bfloat16)
    bf16 = {k: (v.astype(ml_dtypes.bfloat16).view(np.uint16).astype(np.uint32) << 16).view(np.float32) for k, v in sd.items()}
    ref_c = {**c, **c.get("rope_parameters", {}), "rope_scaling": c.get("rope_scaling") or c.get("rope_parameters")}
    want = hf_greedy(ref_c, bf16, PROMPT, 5)
    assert not np.allclose(want[1], hf_greedy(LLAMA3, sd, PROMPT, 5)[1])  # bfloat16 really changed the numbers
    assert_same_run(wafer_greedy(path, PROMPT, 5, "token", tiles=(1, 2)), want)


def test_linear_rope_scaling_runs_as_the_reference(tmp_path):
    """Linear RoPE scaling (positions interpolated by the factor), read from a Hugging Face config."""
    c = {**LLAMA3, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}
    sd = hf_state(c, 5)
    want = hf_greedy(c, sd, PROMPT, 4)
    assert not np.allclose(want[1], hf_greedy(LLAMA3, sd, PROMPT, 4)[1])  # the scaling changes the numbers
    assert_same_run(wafer_greedy(write_hf(tmp_path / "linear", c, sd), PROMPT, 4, "token"), want)


@pytest.mark.parametrize("form", ["hf", "gguf"])
def test_a_qwen2_checkpoint_runs_as_the_reference(tmp_path, form):
    """Qwen2: q, k, v biases, tied embeddings, rotate-half RoPE in both formats (llama.cpp keeps Qwen2's q and k
    as they are): greedy tokens and logits equal the reference's, token by token and prefilled on the mesh."""
    sd = hf_state(QWEN2, 3)
    path = (write_hf(tmp_path / "qwen2", QWEN2, sd) if form == "hf"
            else write_gguf(tmp_path / "qwen2.gguf", QWEN2, sd, "qwen2", QWEN2_SPECIAL))
    cfg = load_model(str(path))[0]
    assert cfg.qkv_bias and cfg.tied_embeddings
    want = hf_greedy(QWEN2, sd, PROMPT, 5)
    assert_same_run(wafer_greedy(path, PROMPT, 5, "token", tiles=(2, 1)), want)
    assert_same_run(wafer_greedy(path, PROMPT, 5, "mesh"), want)


def test_without_its_biases_qwen2_would_differ(tmp_path):
    """The biases matter to the reference's numbers (the tests above would catch them dropped)."""
    sd = hf_state(QWEN2, 3)
    plain = {k: v for k, v in sd.items() if not k.endswith(".bias")}
    assert not np.allclose(hf_logits(QWEN2, sd, PROMPT), hf_logits(QWEN2, plain, PROMPT), atol=1e-2)


def test_a_converted_qwen2_keeps_its_biases_and_tokenizer(tmp_path):
    """wafer-llm convert of a Qwen2 GGUF: the tiles read the biases from their shards and decode as from the file."""
    from llm.converted import convert
    from wafer_actors.device import preset

    sd = hf_state(QWEN2, 4)
    path = write_gguf(tmp_path / "qwen2.gguf", QWEN2, sd, "qwen2", QWEN2_SPECIAL)
    cfg, weights, tok = load_model(str(path))
    convert(cfg, weights, tok, tmp_path / "conv", mesh=(4, 4), device=preset("wse2"), tokens=len(PROMPT) + 5)
    conv_tok = load_model(str(tmp_path / "conv"))[2]
    assert all(conv_tok.encode(t) == tok.encode(t) for t in TRICKY)
    assert_same_run(wafer_greedy(tmp_path / "conv", PROMPT, 5, "token"), hf_greedy(QWEN2, sd, PROMPT, 5))


def test_generate_traces_and_draws_a_checkpoint_of_its_own(tmp_path):
    """``generate --trace --heatmap --json`` on a small Llama-3 style GGUF over two regions: the trace holds the
    prefill's and every decode step's layers, the JSON each operation's utilisation and each region's heatmap."""
    from llm.cli import main

    sd = hf_state(LLAMA3, 6)
    path = write_gguf(tmp_path / "llama3.gguf", LLAMA3, sd, "llama-bpe", LLAMA3_SPECIAL)
    out, trace, heat = tmp_path / "out.json", tmp_path / "t.json", tmp_path / "h.png"
    assert main(["generate", "--model", str(path), "--prompt", "The capital of France is", "--max-new-tokens", "3",
                 "--mesh", "8x8", "--regions", "2", "--transport", "local", "--json", str(out), "--trace", str(trace),
                 "--heatmap", str(heat)]) == 0
    report = json.loads(out.read_text())
    ops = report["predicted"]["decode_ops"]  # each operation's share of the decode steps and its utilisation
    assert sum(o["share_of_time"] for o in ops.values()) == pytest.approx(1)
    assert ops["gate_up"]["mbu"] > ops["attn_norm"]["mbu"] > 0 and ops["softmax"]["mbu"] == 0
    events = json.loads(trace.read_text())["traceEvents"]
    layers = sum(e["name"].startswith("layer ") for e in events if e["ph"] == "X" and e["pid"] == 1)
    assert layers == LLAMA3["num_hidden_layers"] * 3  # the prefill and 2 decode steps
    assert heat.stat().st_size > 5000 and [r["mesh"] for r in report["heatmap"]] == [[8, 8], [8, 8]]
    high = max(max(map(max, r["sram_high_water_bytes"])) for r in report["heatmap"])
    assert high == report["emulation"]["sram_high_water_bytes"]
