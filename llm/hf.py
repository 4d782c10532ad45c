"""Hugging Face checkpoints: ``config.json`` plus ``*.safetensors`` (one file, or shards with an index).

Hugging Face stores linear weights (out, in) and rotates the two halves of each head in
RoPE; the rest of this package keeps (in, out) and rotates adjacent pairs (as GGUF does).
``load_hf`` permutes the Q and K output columns of every head, half-split to interleaved:
q·k is unchanged and the rotation becomes the adjacent-pair one.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, which safetensors then returns)
import numpy as np

from .checkpoint import LlamaWeights, assemble
from .config import LlamaConfig
from .errors import CheckpointError


def hf_config(path: Path) -> LlamaConfig:
    """Read a Llama config from ``config.json``."""
    try:
        c = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path / 'config.json'}: {err}") from err
    _refuse_unsupported_hf(c, path / "config.json")
    rope = c.get("rope_parameters") or {}  # transformers 5 writes RoPE settings here
    try:
        n_heads = int(c["num_attention_heads"])
        return LlamaConfig(
            name=path.name,
            n_layers=int(c["num_hidden_layers"]),
            dim=int(c["hidden_size"]),
            ffn_dim=int(c["intermediate_size"]),
            n_heads=n_heads,
            n_kv_heads=int(c.get("num_key_value_heads", n_heads)),
            head_dim=int(c.get("head_dim") or c["hidden_size"] // n_heads),
            vocab_size=int(c["vocab_size"]),
            rope_base=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
            norm_eps=float(c.get("rms_norm_eps", 1e-5)),
            max_seq_len=int(c.get("max_position_embeddings", 4096)),
            tied_embeddings=bool(c.get("tie_word_embeddings", False)),
        )
    except KeyError as err:
        raise CheckpointError(f"{path / 'config.json'}: key {err} is missing") from None


def _refuse_unsupported_hf(c: dict, where: Path) -> None:
    """Refuse a config that asks for what this package does not compute, naming the key and its value.

    Raises:
        CheckpointError: another architecture, RoPE scaling, biases, experts or a sliding window.
    """
    def refuse(what: str) -> None:
        raise CheckpointError(f"{where}: {what} is not supported")

    if c.get("model_type", "llama") != "llama":
        refuse(f"model_type {c['model_type']!r} (only 'llama')")
    if any(a != "LlamaForCausalLM" for a in c.get("architectures", [])):
        refuse(f"architectures {c['architectures']} (only LlamaForCausalLM)")
    for key in ("rope_scaling", "rope_parameters"):
        kind = (c.get(key) or {}).get("rope_type", (c.get(key) or {}).get("type", "default"))
        if kind != "default":
            refuse(f"{key} of type {kind!r} (only unscaled RoPE)")
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            refuse(f"{key} {c[key]!r} (no biases)")
    if c.get("num_local_experts") or c.get("num_experts"):
        refuse("a mixture of experts")
    if c.get("use_sliding_window") or (c.get("sliding_window") and "use_sliding_window" not in c):
        refuse(f"sliding_window {c.get('sliding_window')!r}")


def _shards(path: Path) -> dict[str, Path]:
    """Tensor name -> file, from the shard index or the single ``model.safetensors``."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"cannot read the shard index {index}: {err}") from err
        return {name: path / f for name, f in weight_map.items()}
    single = path / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"{path}: neither model.safetensors nor model.safetensors.index.json is there")
    with _open(single) as f:
        return {name: single for name in f.keys()}


def _open(file: Path):
    """``safe_open`` on ``file`` (NumPy arrays; bfloat16 through ``ml_dtypes``), its errors as ``CheckpointError``."""
    from safetensors import safe_open

    try:
        return safe_open(file, framework="numpy")
    except Exception as err:  # the library raises its own error types for missing, short or corrupt files
        raise CheckpointError(f"cannot read safetensors file {file}: {err}") from err


def _read(file: Path, name: str) -> np.ndarray:
    """One tensor as float32 (float16 and bfloat16 widen exactly)."""
    with _open(file) as f:
        try:
            return f.get_tensor(name).astype(np.float32)
        except Exception as err:
            raise CheckpointError(f"cannot read tensor {name!r} from {file}: {err}") from err


def _interleave(heads: int, head_dim: int) -> np.ndarray:
    """Column order that turns each head's half-split RoPE layout into adjacent pairs."""
    half = head_dim // 2
    per_head = np.stack([np.arange(half), np.arange(half) + half], axis=1).ravel()
    return (np.arange(heads)[:, None] * head_dim + per_head).ravel()


HF_NAMES = {
    "tok_embeddings": "model.embed_tokens.weight", "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "wq": "model.layers.{i}.self_attn.q_proj.weight", "wk": "model.layers.{i}.self_attn.k_proj.weight",
    "wv": "model.layers.{i}.self_attn.v_proj.weight", "wo": "model.layers.{i}.self_attn.o_proj.weight",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight", "w_gate": "model.layers.{i}.mlp.gate_proj.weight",
    "w_up": "model.layers.{i}.mlp.up_proj.weight", "w_down": "model.layers.{i}.mlp.down_proj.weight",
    "final_norm": "model.norm.weight", "lm_head": "lm_head.weight",
}


def load_hf(path: str | Path) -> tuple[LlamaConfig, LlamaWeights]:
    """Read a Hugging Face Llama directory: (config, float32 weights in this package's layout).

    Raises:
        CheckpointError: missing or unreadable files, a missing tensor, or a wrong shape.
    """
    path = Path(path)
    cfg = hf_config(path)
    files = _shards(path)
    biases = sorted(n for n in files if n.endswith(".bias"))
    if biases:
        raise CheckpointError(f"{path}: bias tensors ({biases[0]}, ...) are not supported")

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in files:
            raise CheckpointError(f"{path}: tensor {name!r} is missing")
        a = _read(files[name], name)
        a = a.T if a.ndim == 2 else a  # (out, in) -> (in, out)
        if a.shape != shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {a.shape} (as (in, out)), expected {shape}")
        return np.ascontiguousarray(a)

    cols = {"wq": _interleave(cfg.n_heads, cfg.head_dim), "wk": _interleave(cfg.n_kv_heads, cfg.head_dim)}
    return cfg, assemble(cfg, get, HF_NAMES, cols)
