"""Hugging Face checkpoints: ``config.json`` plus ``*.safetensors`` (one file, or shards with an index).

Hugging Face stores linear weights (out, in) and rotates the two halves of each head in
RoPE; the rest of this package keeps (in, out) and rotates adjacent pairs (as GGUF does).
``load_hf`` permutes the Q and K output columns of every head, half-split to interleaved:
q·k is unchanged and the rotation becomes the adjacent-pair one.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

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
            rope_base=float(c.get("rope_theta", 10000.0)),
            norm_eps=float(c.get("rms_norm_eps", 1e-5)),
            max_seq_len=int(c.get("max_position_embeddings", 4096)),
            tied_embeddings=bool(c.get("tie_word_embeddings", False)),
        )
    except KeyError as err:
        raise CheckpointError(f"{path / 'config.json'}: key {err} is missing") from None


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
    return {name: single for name in _header(single)}


def _header(file: Path) -> dict:
    """The JSON header of a safetensors file (checked against the file's size)."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as err:
        raise CheckpointError(f"cannot read safetensors file {file}: {err}") from err
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if file.stat().st_size < 8 + n + end:
        raise CheckpointError(f"safetensors file {file} is truncated: {file.stat().st_size} bytes, the header needs {8 + n + end}")
    header.pop("__metadata__", None)
    return header


def _read(file: Path, name: str) -> np.ndarray:
    """One tensor as float32 (bfloat16 widened by hand: NumPy has no bfloat16)."""
    from safetensors import safe_open

    info = _header(file)[name]
    if info["dtype"] == "BF16":
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            start, stop = info["data_offsets"]
            f.seek(8 + n + start)
            raw = np.frombuffer(f.read(stop - start), dtype=np.uint16)
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
    try:
        with safe_open(file, framework="numpy") as f:
            return f.get_tensor(name).astype(np.float32)
    except Exception as err:  # the library raises its own error types for corrupt files
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
