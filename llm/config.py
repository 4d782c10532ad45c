"""Llama model shapes: the fields a decode needs, with presets for the paper's models."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from wafer_actors.errors import InvalidArgument

from .errors import CheckpointError


@dataclass(frozen=True)
class LlamaConfig:
    """The shape of a Llama-architecture model.

    Attributes:
        name: preset or checkpoint name, for reports.
        n_layers: transformer blocks.
        dim: hidden size (embedding width).
        ffn_dim: SwiGLU hidden size.
        n_heads: query heads.
        n_kv_heads: key/value heads (GQA when fewer than n_heads).
        head_dim: size of one head (dim / n_heads for every preset).
        vocab_size: tokens in the embedding and the LM head.
        rope_base: RoPE frequency base (theta).
        norm_eps: RMSNorm epsilon.
        max_seq_len: longest context the model was trained for.
        tied_embeddings: the LM head reuses the token embedding.
        rope_factors: RoPE scaling as a divisor of each of a head's head_dim / 2 frequencies
            (``rope_scaling_factors``); None: unscaled.
        qkv_bias: the q, k and v projections add a bias (Qwen2).
    """

    name: str
    n_layers: int
    dim: int
    ffn_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 4096
    tied_embeddings: bool = False
    rope_factors: tuple[float, ...] | None = None
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        if self.rope_factors is not None:  # a list when read back from JSON
            object.__setattr__(self, "rope_factors", tuple(float(f) for f in self.rope_factors))
            if len(self.rope_factors) != self.head_dim // 2 or not all(f > 0 for f in self.rope_factors):
                raise InvalidArgument(f"model {self.name!r}: rope_factors must be {self.head_dim // 2} positive numbers "
                                      f"(one per RoPE frequency), got {len(self.rope_factors)}")
        for name in ("n_layers", "dim", "ffn_dim", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise InvalidArgument(f"model {self.name!r}: {name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise InvalidArgument(f"model {self.name!r}: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise InvalidArgument(f"model {self.name!r}: head_dim {self.head_dim} must be even for RoPE")

    @property
    def kv_dim(self) -> int:
        """Width of the K and V projections."""
        return self.n_kv_heads * self.head_dim

    def rope_freqs(self) -> np.ndarray:
        """Angle per position of each RoPE pair of a head (head_dim / 2,), float64: base^(-2i/head_dim), scaled."""
        freqs = self.rope_base ** (-np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        return freqs if self.rope_factors is None else freqs / np.asarray(self.rope_factors)

    def n_params(self) -> int:
        """Parameters, counting a tied LM head once."""
        per_layer = 2 * self.dim + self.dim * (self.n_heads * self.head_dim) * 2 + 2 * self.dim * self.kv_dim + 3 * self.dim * self.ffn_dim
        if self.qkv_bias:
            per_layer += self.n_heads * self.head_dim + 2 * self.kv_dim
        head = 0 if self.tied_embeddings else self.vocab_size * self.dim
        return self.n_layers * per_layer + self.vocab_size * self.dim + self.dim + head


def rope_scaling_factors(kind: str, params: dict, head_dim: int, base: float, where: str) -> tuple[float, ...] | None:
    """The divisor of each RoPE frequency that a checkpoint's RoPE scaling asks for.

    ``linear`` divides every frequency by ``factor`` (positions interpolated). ``llama3``
    (Llama 3.1) leaves wavelengths shorter than ``original_max_position_embeddings /
    high_freq_factor`` as they are, divides those longer than ``original / low_freq_factor``
    by ``factor``, and between the two blends the scaled and unscaled frequency linearly in
    ``original / wavelength``. ``default`` (or none): no scaling.

    Raises:
        CheckpointError: another kind, or a missing parameter (named with ``where``).
    """
    def get(key: str) -> float:
        if key not in params:
            raise CheckpointError(f"{where}: RoPE scaling {kind!r} needs {key!r}")
        return float(params[key])

    if kind in (None, "default", "none"):
        return None
    n = head_dim // 2
    if kind == "linear":
        return (get("factor"),) * n
    if kind == "llama3":
        factor, low, high = get("factor"), get("low_freq_factor"), get("high_freq_factor")
        original = get("original_max_position_embeddings")
        out = []
        for i in range(n):
            wavelength = 2 * math.pi * base ** (2 * i / head_dim)
            if wavelength < original / high:
                out.append(1.0)
            elif wavelength > original / low:
                out.append(factor)
            else:  # freq' = (1 - s) freq / factor + s freq, as a divisor of freq
                s = (original / wavelength - low) / (high - low)
                out.append(1.0 / ((1 - s) / factor + s))
        return tuple(out)
    raise CheckpointError(f"{where}: RoPE scaling of type {kind!r} is not supported (only 'linear' and 'llama3')")


# Public model cards (Hugging Face config.json of each model).
PRESETS: dict[str, LlamaConfig] = {
    "smollm2-135m": LlamaConfig("smollm2-135m", 30, 576, 1536, 9, 3, 64, 49152, 100000.0, 1e-5, 8192, True),
    "llama3-8b": LlamaConfig("llama3-8b", 32, 4096, 14336, 32, 8, 128, 128256, 500000.0, 1e-5, 8192),
    "llama2-13b": LlamaConfig("llama2-13b", 40, 5120, 13824, 40, 40, 128, 32000, 10000.0, 1e-5, 4096),
    "codellama-34b": LlamaConfig("codellama-34b", 48, 8192, 22016, 64, 8, 128, 32000, 1000000.0, 1e-5, 16384),
    "qwen2-72b": LlamaConfig("qwen2-72b", 80, 8192, 29568, 64, 8, 128, 152064, 1000000.0, 1e-6, 32768),
}


def preset(name: str) -> LlamaConfig:
    """Return a model preset by name.

    Raises:
        ValueError: unknown name (the message lists the presets).
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise InvalidArgument(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}") from None
