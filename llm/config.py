"""Llama model shapes: the fields a decode needs, with presets for the paper's models."""

from __future__ import annotations

from dataclasses import dataclass

from wafer_actors.errors import InvalidArgument


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

    def __post_init__(self) -> None:
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

    def n_params(self) -> int:
        """Parameters, counting a tied LM head once."""
        per_layer = 2 * self.dim + self.dim * (self.n_heads * self.head_dim) * 2 + 2 * self.dim * self.kv_dim + 3 * self.dim * self.ffn_dim
        head = 0 if self.tied_embeddings else self.vocab_size * self.dim
        return self.n_layers * per_layer + self.vocab_size * self.dim + self.dim + head


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
