"""The kernel the paper measured, beside the real model: ``paper`` and ``faithful``.

The WaferLLM figures come from the authors' timing kernels, not from the real models:
their decode configurations are single-head (``n_heads = n_kv_heads = 1``, ``head_dim =
dim``, so K and V are full dim x dim projections) with dim, FFN width and sequence
rounded up to multiples of the grid side P, and a fixed ``group_num`` per grid (reference
digest section 7.1); their prefill is the same shapes with dense attention (no causal
mask) and single-phase chain allreduces (section 9). Calibrating a GQA model against a
measurement of that kernel would mix a modelling error into the fit, so calibration runs
``paper``; ``faithful`` (the real model: GQA, real dimensions, causal mask, K-tree
allreduces) is what ``generate`` runs.

The paper kernel is a timing configuration: it runs cost-only (the authors' launchers feed
random data too).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from wafer_actors.errors import InvalidArgument

from .config import LlamaConfig

KERNELS = ("paper", "faithful")

# The authors' decode configurations (section 7.1): (dim, ffn_dim, seq_len, group_num) per grid side.
# Listed values win over the rule below (240: dim 4080 is rounded down; 512: group_num 32).
_LISTED = {
    "llama3-8b": {240: (4080, 14400, 4080, 15), 256: (4096, 14336, 4096, 16), 300: (4200, 14400, 4200, 15),
                  360: (4320, 14400, 4320, 18), 420: (4200, 14700, 4200, 20), 480: (4320, 14400, 4320, 20),
                  512: (4096, 14336, 4096, 32), 540: (4320, 14580, 4320, 20), 600: (4200, 14400, 4200, 24),
                  660: (4620, 14520, 4620, 22), 720: (4320, 14400, 4320, 24)},
    "qwen2-72b": {360: (8280, 29880, 4320, 18), 420: (8400, 29820, 4200, 20), 480: (8640, 29760, 4320, 20),
                  540: (8640, 29700, 4320, 20), 600: (8400, 30000, 4200, 24), 660: (8580, 29700, 4620, 22),
                  720: (8640, 30240, 4320, 24)},
}


@dataclass(frozen=True)
class PaperShape:
    """One paper-kernel configuration: the rounded shapes and the K-tree's groups on a P x P grid."""

    grid: int
    dim: int
    ffn_dim: int
    seq_len: int
    group_num: int


def group_num(p: int) -> int:
    """The authors' rule for ``group_num``: the divisor of P nearest sqrt(P) (the smaller on a tie)."""
    return min((g for g in range(1, p + 1) if p % g == 0), key=lambda g: (abs(g - math.sqrt(p)), g))


def paper_shape(cfg: LlamaConfig, p: int, context: int = 4096) -> PaperShape:
    """The paper kernel's shapes for model ``cfg`` on a P x P grid with a ``context``-token sequence:
    the authors' listed configuration where there is one, else every size rounded up to a multiple of P."""
    if not isinstance(p, int) or p <= 0:
        raise InvalidArgument(f"grid side must be a positive integer, got {p!r}")
    listed = _LISTED.get(cfg.name, {}).get(p)
    if listed is not None and context == 4096:
        return PaperShape(p, *listed)
    up = lambda n: -(-n // p) * p  # noqa: E731
    return PaperShape(p, up(cfg.dim), up(cfg.ffn_dim), up(context), group_num(p))


def paper_config(cfg: LlamaConfig, shape: PaperShape) -> LlamaConfig:
    """``cfg`` as the paper kernel runs it: one head of width dim, K/V dim x dim, the rounded shapes."""
    return dataclasses.replace(cfg, dim=shape.dim, ffn_dim=shape.ffn_dim, n_heads=1, n_kv_heads=1, head_dim=shape.dim,
                               max_seq_len=max(cfg.max_seq_len, shape.seq_len))


def check_kernel(kernel: str) -> str:
    """Refuse an unknown kernel name."""
    if kernel not in KERNELS:
        raise InvalidArgument(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    return kernel
