"""A plain NumPy Llama: the ground truth the wafer decode is checked against.

One function, ``forward(token, pos)``, in execution order with a comment per step
(llama2.c style). float32 throughout; RoPE rotates adjacent pairs of each head.
"""

from __future__ import annotations

import numpy as np

from wafer_actors.errors import InvalidArgument

from .checkpoint import LlamaWeights
from .config import LlamaConfig


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight).astype(np.float32)


def rope(x: np.ndarray, pos: int, freq: np.ndarray) -> np.ndarray:
    """Rotate each adjacent pair (x[2i], x[2i+1]) of every head by pos * freq[i] (``LlamaConfig.rope_freqs``)."""
    angle = pos * freq
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class ReferenceModel:
    """Llama decode one token at a time with a KV cache."""

    def __init__(self, cfg: LlamaConfig, weights: LlamaWeights, max_seq: int | None = None):
        self.cfg, self.w = cfg, weights
        self.freq = cfg.rope_freqs()  # (head_dim/2,)
        self.max_seq = max_seq or cfg.max_seq_len
        shape = (cfg.n_layers, self.max_seq, cfg.n_kv_heads, cfg.head_dim)
        self.k_cache = np.zeros(shape, np.float32)  # (L, seq, n_kv_heads, head_dim)
        self.v_cache = np.zeros(shape, np.float32)

    def forward(self, token: int, pos: int) -> np.ndarray:
        """Run one token at position ``pos``; return the logits (vocab,)."""
        c, w = self.cfg, self.w
        if not 0 <= pos < self.max_seq:
            raise InvalidArgument(f"position {pos} is outside the KV cache of {self.max_seq} tokens")
        group = c.n_heads // c.n_kv_heads
        x = w.tok_embeddings[token].copy()  # (dim,)
        for layer in range(c.n_layers):
            # attention rmsnorm
            h = rmsnorm(x, w.attn_norm[layer], c.norm_eps)
            # qkv matmuls for this position
            q, k, v = h @ w.wq[layer], h @ w.wk[layer], h @ w.wv[layer]
            if c.qkv_bias:
                q, k, v = q + w.bq[layer], k + w.bk[layer], v + w.bv[layer]
            q = q.reshape(c.n_heads, c.head_dim)  # (n_heads, head_dim)
            k = k.reshape(c.n_kv_heads, c.head_dim)  # (n_kv_heads, head_dim)
            v = v.reshape(c.n_kv_heads, c.head_dim)
            # RoPE on q and k
            q, k = rope(q, pos, self.freq), rope(k, pos, self.freq)
            self.k_cache[layer, pos], self.v_cache[layer, pos] = k, v
            # attention over positions 0..pos, each query head reading its kv head (GQA)
            keys = self.k_cache[layer, : pos + 1]  # (pos+1, n_kv_heads, head_dim)
            values = self.v_cache[layer, : pos + 1]
            qg = q.reshape(c.n_kv_heads, group, c.head_dim)  # (n_kv_heads, group, head_dim)
            scores = np.einsum("kgd,tkd->kgt", qg, keys) / np.float32(np.sqrt(c.head_dim))  # (n_kv_heads, group, pos+1)
            att = softmax(scores)
            out = np.einsum("kgt,tkd->kgd", att, values).reshape(c.n_heads * c.head_dim)
            # output projection and residual
            x = x + out @ w.wo[layer]
            # ffn rmsnorm, SwiGLU, residual
            h = rmsnorm(x, w.ffn_norm[layer], c.norm_eps)
            gate, up = h @ w.w_gate[layer], h @ w.w_up[layer]  # (ffn_dim,)
            x = x + (gate / (1 + np.exp(-gate)) * up) @ w.w_down[layer]
        # final rmsnorm and the LM head
        x = rmsnorm(x, w.final_norm, c.norm_eps)
        return (x @ w.lm_head).astype(np.float32)  # (vocab,)
