import numpy as np

from llm.checkpoint import random_weights
from llm.config import LlamaConfig
from llm.reference import ReferenceModel, rmsnorm


def full_sequence_logits(cfg, w, tokens):
    """Logits of every position at once (causal mask, no KV cache): a second, independent path."""
    t = len(tokens)
    x = w.tok_embeddings[tokens]  # (t, dim)
    half = cfg.head_dim // 2
    freq = cfg.rope_base ** (-np.arange(half) * 2.0 / cfg.head_dim)
    ang = np.arange(t)[:, None] * freq[None, :]  # (t, half)
    rot = np.cos(ang) + 1j * np.sin(ang)

    def rope(v):  # v (t, heads, head_dim); adjacent pairs as complex numbers
        z = (v[..., 0::2] + 1j * v[..., 1::2]) * rot[:, None, :]
        out = np.empty_like(v)
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
        return out

    mask = np.triu(np.full((t, t), -np.inf), 1)
    rep = cfg.n_heads // cfg.n_kv_heads
    for i in range(cfg.n_layers):
        h = rmsnorm(x, w.attn_norm[i], cfg.norm_eps)
        q = rope((h @ w.wq[i]).reshape(t, cfg.n_heads, cfg.head_dim))
        k = np.repeat(rope((h @ w.wk[i]).reshape(t, cfg.n_kv_heads, cfg.head_dim)), rep, axis=1)
        v = np.repeat((h @ w.wv[i]).reshape(t, cfg.n_kv_heads, cfg.head_dim), rep, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(cfg.head_dim) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", p, v).reshape(t, -1) @ w.wo[i]
        h = rmsnorm(x, w.ffn_norm[i], cfg.norm_eps)
        g = h @ w.w_gate[i]
        x = x + (g / (1 + np.exp(-g)) * (h @ w.w_up[i])) @ w.w_down[i]
    return rmsnorm(x, w.final_norm, cfg.norm_eps) @ w.lm_head


def test_cached_decode_equals_full_sequence_attention():
    """Token-by-token decode with a KV cache gives the logits of a causal full-sequence pass (GQA, RoPE)."""
    cfg = LlamaConfig("tiny", 3, 32, 48, 4, 2, 8, 60, rope_base=500.0)
    w = random_weights(cfg, seed=1)
    tokens = [5, 17, 3, 59, 0, 22, 41]
    model = ReferenceModel(cfg, w, max_seq=16)
    step = np.stack([model.forward(tok, pos) for pos, tok in enumerate(tokens)])
    np.testing.assert_allclose(step, full_sequence_logits(cfg, w, tokens), rtol=1e-4, atol=1e-4)


def test_default_model_answers_greedily(smollm2, tokenizer):
    """Golden: SmolLM2 greedily answers a chat question with the expected sentence."""
    cfg, w, _ = smollm2
    model = ReferenceModel(cfg, w, max_seq=64)
    ids = tokenizer.encode(tokenizer.chat("What is the capital of France?"))
    for pos, tok in enumerate(ids):
        logits = model.forward(tok, pos)
    out = []
    while len(out) < 12:
        out.append(int(np.argmax(logits)))
        if out[-1] == tokenizer.eos_id:
            break
        logits = model.forward(out[-1], len(ids) + len(out) - 1)
    assert tokenizer.decode(out) == "The capital of France is Paris.<|im_end|>"
