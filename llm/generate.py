"""Generation: feed the prompt through the wafer one token at a time, then sample until done."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .engine import WaferLlama
from .sampling import Sampler


@dataclass
class Generation:
    """A finished generation: ids, why it stopped, and (if asked) the logits of every step."""

    prompt_ids: list[int]
    output_ids: list[int]
    stop: str  # "eos" or "length"
    logits: list[np.ndarray] = field(default_factory=list, repr=False)


def generate(engine: WaferLlama, prompt_ids: list[int], *, max_new_tokens: int, sampler: Sampler | None = None,
             eos_id: int | None = None, keep_logits: bool = False,
             on_token: Callable[[int, int], None] | None = None) -> Generation:
    """Decode ``max_new_tokens`` tokens (fewer at end-of-sequence) after ``prompt_ids``.

    ``on_token(i, token_id)`` is called for every step: prompt tokens (i < len(prompt)) as they
    are fed, then each new token as it is chosen.

    Raises:
        ValueError: an empty prompt, max_new_tokens < 1, or a token id outside the vocabulary.
        PlacementError: prompt plus new tokens exceed the KV cache or the model's context
            (checked before the first token runs).
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    vocab = engine.cfg.vocab_size
    bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    sampler = sampler or Sampler()
    engine.reset()
    engine.placement.check_tokens(len(prompt_ids) + max_new_tokens - 1)  # the last new token is never fed
    out = Generation(list(map(int, prompt_ids)), [], "length")
    logits = None
    for i, tok in enumerate(out.prompt_ids):
        logits, _ = engine.step(tok)
        if keep_logits and i == len(out.prompt_ids) - 1:
            out.logits.append(logits)
        if on_token:
            on_token(i, tok)
    while True:
        tok = sampler(logits)
        out.output_ids.append(tok)
        if on_token:
            on_token(len(out.prompt_ids) + len(out.output_ids) - 1, tok)
        if eos_id is not None and tok == eos_id:
            out.stop = "eos"
            break
        if len(out.output_ids) == max_new_tokens:
            break
        logits, _ = engine.step(tok)
        if keep_logits:
            out.logits.append(logits)
    return out
