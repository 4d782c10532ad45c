"""How well a run uses the device: MoE-CAP's memory-bandwidth and model-FLOPs utilisation.

    MBU = bytes a phase must read from SRAM / (predicted time x aggregate SRAM read bandwidth)
    MFU = FLOPs of the phase / (predicted time x peak FLOPs)

Bytes: every weight the phase multiplies by, read once (the token embedding is a row lookup,
not counted), plus the KV cache entries attention reads. FLOPs: two per multiply-add of the
matrix products (projections, FFN, LM head) and of attention (q.k and p.v over the context).
Norms, RoPE and softmax are left out, as MoE-CAP and the usual MFU leave them out. A dense
model activates every parameter, so S-MBU and S-MFU (which count only the experts a token
uses) equal MBU and MFU; no model with experts is supported yet.

Both are given against the whole device (``mbu``, ``mfu``) and against the cores the model
occupies (``*_cores_used``): a small model on one region leaves most of the wafer idle.
"""

from __future__ import annotations

import numpy as np

from wafer_actors.device import DeviceSpec
from wafer_actors.utilisation import Work, utilisation

from .config import LlamaConfig


def _matmul_params(cfg: LlamaConfig) -> int:
    """Weights multiplied by once per token: every layer's projections and FFN, and the LM head."""
    q = cfg.n_heads * cfg.head_dim
    per_layer = cfg.dim * (q + 2 * cfg.kv_dim) + q * cfg.dim + 3 * cfg.dim * cfg.ffn_dim
    return cfg.n_layers * per_layer + cfg.dim * cfg.vocab_size


def _vector_params(cfg: LlamaConfig) -> int:
    """Norm weights and biases: read once per token, no matrix product."""
    bias = cfg.n_heads * cfg.head_dim + 2 * cfg.kv_dim if cfg.qkv_bias else 0
    return cfg.n_layers * (2 * cfg.dim + bias) + cfg.dim


def decode_op_work(cfg: LlamaConfig, context: int, elem_bytes: int) -> dict[str, Work]:
    """One layer's operations of a decode token attending to ``context`` tokens (the names ``decode_protocol``
    marks), and ``lm_head`` (the final norm with it)."""
    q, kv, d, f = cfg.n_heads * cfg.head_dim, cfg.kv_dim, cfg.dim, cfg.ffn_dim
    bias = q + 2 * kv if cfg.qkv_bias else 0

    def work(reads: int, macs: int = 0) -> Work:
        return Work(bytes=elem_bytes * reads, flops=2 * macs)

    return {"attn_norm": work(d), "qkv": work(d * (q + 2 * kv) + bias, d * (q + 2 * kv)), "rope_kv": work(0),
            "scores": work(kv * context, q * context), "softmax": work(0), "attn_values": work(kv * context, q * context),
            "attn_out": work(q * d, q * d), "ffn_norm": work(d), "gate_up": work(2 * d * f, 2 * d * f),
            "down": work(f * d, f * d), "lm_head": work(d + d * cfg.vocab_size, d * cfg.vocab_size)}


def decode_work(cfg: LlamaConfig, context: int, elem_bytes: int) -> Work:
    """One decode token that attends to ``context`` tokens (itself included): every layer's operations and the head."""
    ops = decode_op_work(cfg, context, elem_bytes)
    head = ops.pop("lm_head")
    layer = sum(ops.values(), Work())
    return Work(cfg.n_layers * layer.bytes + head.bytes, cfg.n_layers * layer.flops + head.flops)


def prefill_work(cfg: LlamaConfig, tokens: int, elem_bytes: int) -> Work:
    """A ``tokens``-token prompt at once, causal: the weights read once, the prompt's K and V written and read once."""
    q = cfg.n_heads * cfg.head_dim
    pairs = tokens * (tokens + 1) // 2  # (query, key) pairs under the causal mask
    kv = 2 * cfg.n_layers * cfg.kv_dim * tokens
    return Work(bytes=elem_bytes * (_matmul_params(cfg) + _vector_params(cfg) + kv),
                flops=2 * (tokens * _matmul_params(cfg) + 2 * cfg.n_layers * q * pairs))


def generation_utilisation(cfg: LlamaConfig, device: DeviceSpec, dtype: str, cores_used: int, prompt_tokens: int,
                           prefill_mode: str, ttft_cycles: float, decode_steps: int, decode_cycles: float) -> dict:
    """MBU and MFU of a generation's two phases: the prompt (a mesh prefill, or one decode step per prompt token)
    up to the first new token, and the decode steps after it (token k attends to the prompt and k + 1 new tokens)."""
    elem = np.dtype(dtype).itemsize
    if prefill_mode == "mesh":
        first = prefill_work(cfg, prompt_tokens, elem)
    else:
        first = sum((decode_work(cfg, t + 1, elem) for t in range(prompt_tokens)), Work())
    rest = sum((decode_work(cfg, prompt_tokens + k + 1, elem) for k in range(decode_steps)), Work())
    return {"prefill": utilisation(first, ttft_cycles / device.clock_hz, device, dtype, cores_used),
            "decode": utilisation(rest, decode_cycles / device.clock_hz, device, dtype, cores_used)}


def op_utilisation(cfg: LlamaConfig, device: DeviceSpec, dtype: str, cores_used: int, steps: list,
                   first_position: int) -> dict[str, dict]:
    """MBU and MFU of each decode operation over traced decode steps (``StepStats.phases``; step k at position
    ``first_position + k``), with its share of the steps' time: summed work over summed time per operation."""
    elem = np.dtype(dtype).itemsize
    work: dict[str, Work] = {}
    cycles: dict[str, float] = {}
    for k, st in enumerate(steps):
        ops = decode_op_work(cfg, first_position + k + 1, elem)
        for phases in st.phases:
            last = 0.0
            for label, end, _, _ in phases:
                if label.startswith("."):
                    continue
                op = label.split(":", 1)[1]
                work[op] = work.get(op, Work()) + ops[op]
                cycles[op] = cycles.get(op, 0.0) + end - last
                last = end
    total = sum(cycles.values())
    return {op: {**utilisation(work[op], cycles[op] / device.clock_hz, device, dtype, cores_used),
                 "share_of_time": cycles[op] / total if total else 0.0} for op in cycles}
