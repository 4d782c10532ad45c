"""Hugging Face checkpoints: ``config.json`` plus ``*.safetensors`` (one file, or shards with an index).

Llama (``LlamaForCausalLM``) and Qwen2 (``Qwen2ForCausalLM``: a Llama with q, k, v biases);
RoPE unscaled or scaled (``linear``, ``llama3``), from ``rope_scaling`` or transformers 5's
``rope_parameters``.

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

from .checkpoint import LlamaWeights, assemble, rotate_half_columns
from .config import LlamaConfig, rope_scaling_factors
from .errors import CheckpointError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def hf_config(path: Path) -> LlamaConfig:
    """Read a Llama config from ``config.json``."""
    try:
        c = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path / 'config.json'}: {err}") from err
    _refuse_unsupported_hf(c, path / "config.json")
    rope = c.get("rope_parameters") or {}  # transformers 5 writes RoPE settings here
    scaling = rope if rope.get("rope_type", "default") != "default" else c.get("rope_scaling") or {}
    try:
        n_heads = int(c["num_attention_heads"])
        head_dim = int(c.get("head_dim") or c["hidden_size"] // n_heads)
        base = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
        return LlamaConfig(
            name=path.name,
            n_layers=int(c["num_hidden_layers"]),
            dim=int(c["hidden_size"]),
            ffn_dim=int(c["intermediate_size"]),
            n_heads=n_heads,
            n_kv_heads=int(c.get("num_key_value_heads", n_heads)),
            head_dim=head_dim,
            vocab_size=int(c["vocab_size"]),
            rope_base=base,
            norm_eps=float(c.get("rms_norm_eps", 1e-5)),
            max_seq_len=int(c.get("max_position_embeddings", 4096)),
            tied_embeddings=bool(c.get("tie_word_embeddings", False)),
            rope_factors=rope_scaling_factors(scaling.get("rope_type", scaling.get("type")), scaling, head_dim, base,
                                              str(path / "config.json")),
            qkv_bias=c.get("model_type", "llama") == "qwen2",
        )
    except KeyError as err:
        raise CheckpointError(f"{path / 'config.json'}: key {err} is missing") from None


def _refuse_unsupported_hf(c: dict, where: Path) -> None:
    """Refuse a config that asks for what this package does not compute, naming the key and its value.

    Raises:
        CheckpointError: another architecture, RoPE scaling other than linear and llama3, biases other than
            Qwen2's, experts or a sliding window.
    """
    def refuse(what: str) -> None:
        raise CheckpointError(f"{where}: {what} is not supported")

    kind = c.get("model_type", "llama")
    if kind not in ARCHITECTURES:
        refuse(f"model_type {kind!r} (only {', '.join(map(repr, ARCHITECTURES))})")
    if any(a != ARCHITECTURES[kind] for a in c.get("architectures", [])):
        refuse(f"architectures {c['architectures']} (only {ARCHITECTURES[kind]} for model_type {kind!r})")
    for key in ("rope_scaling", "rope_parameters"):
        scaling = c.get(key) or {}
        rope = scaling.get("rope_type", scaling.get("type", "default"))
        if rope not in ("default", "linear", "llama3"):
            refuse(f"{key} of type {rope!r} (only unscaled RoPE, 'linear' and 'llama3')")
    if c.get("attention_bias"):  # Llama's puts a bias on o_proj too
        refuse(f"attention_bias {c['attention_bias']!r} (only Qwen2's q, k, v biases)")
    if c.get("mlp_bias"):
        refuse(f"mlp_bias {c['mlp_bias']!r} (no biases in the MLP)")
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


HF_NAMES = {
    "tok_embeddings": "model.embed_tokens.weight", "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "wq": "model.layers.{i}.self_attn.q_proj.weight", "wk": "model.layers.{i}.self_attn.k_proj.weight",
    "wv": "model.layers.{i}.self_attn.v_proj.weight", "wo": "model.layers.{i}.self_attn.o_proj.weight",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight", "w_gate": "model.layers.{i}.mlp.gate_proj.weight",
    "w_up": "model.layers.{i}.mlp.up_proj.weight", "w_down": "model.layers.{i}.mlp.down_proj.weight",
    "final_norm": "model.norm.weight", "lm_head": "lm_head.weight",
    "bq": "model.layers.{i}.self_attn.q_proj.bias", "bk": "model.layers.{i}.self_attn.k_proj.bias",
    "bv": "model.layers.{i}.self_attn.v_proj.bias",
}
BIASES = ("bq", "bk", "bv")


def load_hf(path: str | Path) -> tuple[LlamaConfig, LlamaWeights]:
    """Read a Hugging Face Llama directory: (config, float32 weights in this package's layout).

    Raises:
        CheckpointError: missing or unreadable files, a missing tensor, or a wrong shape.
    """
    path = Path(path)
    cfg = hf_config(path)
    files = _shards(path)
    allowed = {HF_NAMES[b].format(i=i) for b in BIASES for i in range(cfg.n_layers)} if cfg.qkv_bias else set()
    biases = sorted(n for n in files if n.endswith(".bias") and n not in allowed)
    if biases:
        raise CheckpointError(f"{path}: bias tensors ({biases[0]}, ...) are not supported (only Qwen2's q, k, v biases)")

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in files:
            raise CheckpointError(f"{path}: tensor {name!r} is missing")
        a = _read(files[name], name)
        a = a.T if a.ndim == 2 else a  # (out, in) -> (in, out)
        if a.shape != shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {a.shape} (as (in, out)), expected {shape}")
        return np.ascontiguousarray(a)

    return cfg, assemble(cfg, get, HF_NAMES, rotate_half_columns(cfg))
