"""Generation: run the prompt through the wafer (prefill, or one token at a time), then sample until done."""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable, Collection

import numpy as np

from wafer_actors.errors import InvalidArgument

from .engine import PrefillStats, WaferLlama
from .sampling import Sampler

PREFILL_MODES = ("mesh", "token")


@dataclass
class Generation:
    """A finished generation: ids, why it stopped, predicted cycles and (if asked) the logits of every step.

    ``ttft_cycles``: until the first new token's logits (the prompt: prefill, or one decode
    step per prompt token). ``decode_cycles``: everything after (the KV hand-over after a
    prefill, then one decode step per further token).
    """

    prompt_ids: list[int]
    output_ids: list[int]
    stop: str  # "eos" or "length"
    prefill_mode: str = "token"
    ttft_cycles: float = 0.0
    decode_cycles: float = 0.0
    decode_steps: int = 0
    prefill: PrefillStats | None = None
    logits: list[np.ndarray] = field(default_factory=list, repr=False)

    def timing(self, clock_hz: float) -> dict:
        """Predicted time to first token, decode speed and end-to-end tokens/s per request (WaferLLM's TPR).

        ``decode_tokens_per_s`` counts the new tokens after the first over the decode time, the
        KV hand-over after a mesh prefill included; the engine's ``steps_per_s`` is the rate of
        bare decode steps (what the paper's decode TPR measures).
        """
        ttft, dec = self.ttft_cycles / clock_hz, self.decode_cycles / clock_hz
        return {
            "prefill": self.prefill_mode,
            "ttft_s": ttft,
            "prefill_tokens_per_s": len(self.prompt_ids) / ttft if ttft else 0.0,
            "decode_tokens_per_s": self.decode_steps / dec if dec else 0.0,
            "e2e_tokens_per_s": len(self.output_ids) / (ttft + dec) if ttft + dec else 0.0,
            "handover_s": self.prefill.handover_cycles / clock_hz if self.prefill else 0.0,
        }


def generate(engine: WaferLlama, prompt_ids: list[int], *, max_new_tokens: int, sampler: Sampler | None = None,
             stop_ids: Collection[int] = (), keep_logits: bool = False, prefill: str = "token",
             on_token: Callable[[int, int], None] | None = None,
             on_layer: Callable[[int, int], None] | None = None) -> Generation:
    """Decode ``max_new_tokens`` tokens (fewer at end-of-sequence) after ``prompt_ids``.

    ``prefill="mesh"`` runs the whole prompt at once with ``WaferLlama.prefill`` (the engine
    must have been placed with ``prefill_tokens`` >= the prompt's length); ``"token"``
    feeds it one decode step per token. Generation stops after a token of ``stop_ids`` (the
    tokenizer's ``stop_ids``: end of sequence, end of turn). ``on_token(i, token_id)`` is called for every
    prompt token (i < len(prompt)), then for each new token as it is chosen;
    ``on_layer(done, total)`` after every layer of a mesh prefill.

    Raises:
        ValueError: an empty prompt, max_new_tokens < 1, a token id outside the vocabulary, or
            an unknown ``prefill``.
        PlacementError: prompt plus new tokens exceed the KV cache or the model's context, or
            the prompt is longer than the prefill room (checked before the first token runs).
    """
    if prefill not in PREFILL_MODES:
        raise InvalidArgument(f"prefill must be one of {PREFILL_MODES}, got {prefill!r}")
    if not prompt_ids:
        raise InvalidArgument("the prompt is empty: give at least one token")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidArgument(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    vocab = engine.cfg.vocab_size
    bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
    if bad:
        raise InvalidArgument(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    sampler = sampler or Sampler()
    engine.reset()
    engine.placement.check_tokens(len(prompt_ids) + max_new_tokens - 1)  # the last new token is never fed
    if prefill == "mesh":
        engine.placement.check_prefill(len(prompt_ids))
    out = Generation(list(map(int, prompt_ids)), [], "length", prefill)
    if prefill == "mesh":
        all_logits, out.prefill = engine.prefill(out.prompt_ids, on_layer=on_layer)
        logits = all_logits[-1]
        out.ttft_cycles, out.decode_cycles = out.prefill.ttft_cycles, out.prefill.handover_cycles
        if keep_logits:
            out.logits.append(logits)
        for i, tok in enumerate(out.prompt_ids):
            if on_token:
                on_token(i, tok)
    else:
        for i, tok in enumerate(out.prompt_ids):
            logits, st = engine.step(tok)
            out.ttft_cycles += st.cycles
            if keep_logits and i == len(out.prompt_ids) - 1:
                out.logits.append(logits)
            if on_token:
                on_token(i, tok)
    while True:
        tok = sampler(logits)
        out.output_ids.append(tok)
        if on_token:
            on_token(len(out.prompt_ids) + len(out.output_ids) - 1, tok)
        if tok in stop_ids:
            out.stop = "eos"
            break
        if len(out.output_ids) == max_new_tokens:
            break
        logits, st = engine.step(tok)
        out.decode_cycles += st.cycles
        out.decode_steps += 1
        if keep_logits:
            out.logits.append(logits)
    return out
