"""Choosing the next token from logits: greedy, temperature, top-k and top-p, seeded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wafer_actors.errors import InvalidArgument


@dataclass(frozen=True)
class Sampler:
    """How to pick a token. ``temperature = 0`` is greedy (arg-max).

    Raises:
        ValueError: a negative temperature, top_k < 0, or top_p outside (0, 1].
    """

    temperature: float = 0.0
    top_k: int = 0  # 0: no cut
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise InvalidArgument(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "_rng", np.random.default_rng(self.seed))

    def __call__(self, logits: np.ndarray) -> int:
        """Return the chosen token id."""
        if self.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        order = np.argsort(-z, kind="stable")  # most likely first
        if self.top_k:
            order = order[: self.top_k]
        p = np.exp(z[order] - z[order[0]])
        p /= p.sum()
        if self.top_p < 1:
            keep = np.searchsorted(np.cumsum(p), self.top_p) + 1  # smallest prefix reaching top_p
            order, p = order[:keep], p[:keep] / p[:keep].sum()
        return int(order[self._rng.choice(len(order), p=p)])
