"""Whole-device runs, cost-only: a model's shapes laid over the whole fabric, prefilled and decoded.

The model goes on square regions of one side, as many as it needs, placed in snake order over
the fabric (consecutive regions are neighbours). With no side asked for, the side is the one
whose regions use the most cores (the largest such side on a tie). A model that the fabric
cannot hold is refused, naming the nearest fit (the regions and bytes it needs, those the
fabric holds), unless
``one_layer``: then one decoder layer is measured on one region of the side (default: the
largest square the fabric holds) and scaled by the number of layers, as the paper measured,
and the report says so.

All regions are parts of one wafer, one clock per core: the activation's hand-off between
regions (and the prompt's crossing) is a transfer on the fabric (``llm.regions``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from wafer_actors.device import DeviceSpec
from wafer_actors.errors import InvalidArgument

from .calibration import decode_layer, prefill_layer
from .config import LlamaConfig
from .engine import WaferLlama
from .placement import Placement, PlacementError, place_unbounded
from .regions import snake

F16 = 2  # bytes per element: the paper's float16


@dataclass(frozen=True)
class WholePlan:
    """Square regions of ``side`` cores laid over the fabric: ``origins`` (top-left core of each, snake order)."""

    device: DeviceSpec
    side: int
    placement: Placement
    origins: tuple[tuple[int, int], ...]

    @property
    def regions_fit(self) -> int:
        """Regions of this side the fabric holds."""
        return _regions_fit(self.device, self.side)

    @property
    def idle_cores(self) -> int:
        """Cores of the fabric no region uses."""
        return self.device.cores - len(self.origins) * self.side**2


def _regions_fit(device: DeviceSpec, side: int) -> int:
    return (device.height // side) * (device.width // side)


def check_context(cfg: LlamaConfig, prompt_tokens: int, new_tokens: int) -> int:
    """The positions a run needs (``prompt_tokens + new_tokens - 1``).

    Raises:
        InvalidArgument: more than the model's context.
    """
    tokens = prompt_tokens + new_tokens - 1
    if tokens > cfg.max_seq_len:
        raise InvalidArgument(f"{prompt_tokens} prompt tokens and {new_tokens} new ones make {tokens} positions; "
                              f"{cfg.name}'s context is {cfg.max_seq_len}")
    return tokens


def _placement(cfg: LlamaConfig, device: DeviceSpec, side: int, tokens: int, prefill_tokens: int, kv: str
               ) -> Placement | None:
    """The model on as many side x side regions as it needs (the fabric's size aside), or None if one layer does
    not fit one region."""
    try:
        return place_unbounded(cfg, device, side, kv_mode=kv, tokens=tokens, prefill_tokens=prefill_tokens,
                               elem_bytes=F16)
    except PlacementError:
        return None


def plan_whole(cfg: LlamaConfig, device: DeviceSpec, tokens: int, prefill_tokens: int, side: int | None = None,
               kv: str = "shift") -> WholePlan:
    """Lay the model, with ``tokens`` KV entries and room to prefill ``prefill_tokens``, on the fabric (see the
    module docstring).

    Raises:
        PlacementError: no side (or not ``side``) lets the fabric hold the model: the message gives, for the side
            that comes nearest, the regions and bytes needed and what the fabric holds.
    """
    sides = [side] if side else range(1, min(device.height, device.width) + 1)
    best, nearest = None, None  # (cores used, side, placement); (regions needed / regions fit, side, placement)
    for s in sides:
        p = _placement(cfg, device, s, tokens, prefill_tokens, kv)
        if p is None:
            continue
        n, fit = len(p.regions), _regions_fit(device, s)
        if n <= fit and (best is None or n * s * s >= best[0]):
            best = (n * s * s, s, p)
        if nearest is None or n / fit < nearest[0]:
            nearest = (n / fit, s, p)
    if best is not None:
        _, s, p = best
        return WholePlan(device, s, p, snake((device.height, device.width), (s, s), len(p.regions)))
    room = f"{tokens} tokens of KV cache and room to prefill {prefill_tokens}"
    if nearest is None:
        largest = side or min(device.height, device.width)
        raise PlacementError(f"one layer of {cfg.name} (float16) with {room} does not fit a {largest}x{largest}-core "
                             f"region{'' if side else ', the largest square'} of {device.name}")
    _, s, p = nearest
    n, fit = len(p.regions), _regions_fit(device, s)
    slots = -(-tokens // s) if kv == "shift" else tokens  # KV entries per core the run needs
    need = sum(r.bytes_fixed + r.bytes_prefill + r.bytes_slot * slots for r in p.regions) * s * s
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    raise PlacementError(
        f"{cfg.name} (float16) with {room} needs {n} regions of {s}x{s} cores ({gib(need)} of core memory), the "
        f"nearest fit; {device.name} holds {fit} such region(s) ({gib(fit * s * s * device.sram_bytes)}; "
        f"{gib(device.cores * device.sram_bytes)} in all). Ask for --one-layer (one layer measured and scaled by the "
        "layer count, as the paper did) or fewer --prompt-tokens")


def run_whole(cfg: LlamaConfig, device: DeviceSpec, prompt_tokens: int, new_tokens: int, *, side: int | None = None,
              one_layer: bool = False, kv: str = "shift", algo: str = "ktree", executor: str = "fused",
              on_layer: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Prefill ``prompt_tokens`` and decode until ``new_tokens`` tokens are out (the first comes from the prefill);
    return the predicted time to first token, tokens/s (None for one token) and the per-region figures.

    Raises:
        PlacementError: the model does not fit the fabric (``one_layer``: one layer does not fit the region).
        InvalidArgument: more positions than the model's context.
    """
    tokens = check_context(cfg, prompt_tokens, new_tokens)
    t0 = time.perf_counter()
    if one_layer:
        side = side or min(device.height, device.width)
        return _one_layer(cfg, device, prompt_tokens, new_tokens, side, kv, algo, executor, t0)
    plan = plan_whole(cfg, device, tokens, prompt_tokens, side, kv)
    with WaferLlama(cfg, None, mesh=(plan.side, plan.side), device=device, cost_only=True, dtype="float16",
                    tokens=tokens, prefill_tokens=prompt_tokens, regions=len(plan.origins), kv=kv, algo=algo,
                    transport="local", executor=executor) as m:
        _, pre = m.prefill(prompt_tokens, on_layer)
        steps = [m.step(0)[1] for _ in range(new_tokens - 1)]
        sram = [int(r.memory()[1].max()) for r in m.wafer.regions]
    decode = sum(st.cycles for st in steps) / len(steps) if steps else None
    return {
        "model": cfg.name, "device": device.name, "method": f"all {cfg.n_layers} layers run",
        "side": plan.side, "regions": len(plan.origins), "regions_fit": plan.regions_fit, "idle_cores": plan.idle_cores,
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
        "ttft_s": device.seconds(pre.ttft_cycles), "decode_cycles_per_token": decode,
        "decode_tps": None if decode is None else device.clock_hz / decode,
        "handoff_cycles_per_token": steps[-1].handoff_cycles if steps and len(plan.origins) > 1 else None,
        "crossing_cycles": pre.crossing_cycles,
        "handover_cycles": pre.handover_cycles if steps else None,
        "region_table": [
            {"region": i, "origin": list(o), "layers": r.layers, "lm_head": r.head, "sram_high_water_bytes": sram[i],
             "prefill_cycles": pre.region_cycles[i], "decode_cycles": steps[-1].region_cycles[i] if steps else None}
            for i, (o, r) in enumerate(zip(plan.origins, plan.placement.regions))],
        "host_s": time.perf_counter() - t0,
        "decode_host_s_per_token": sum(st.host_s for st in steps) / len(steps) if steps else None,
    }


def _one_layer(cfg: LlamaConfig, device: DeviceSpec, prompt_tokens: int, new_tokens: int, side: int, kv: str,
               algo: str, executor: str, t0: float) -> dict[str, Any]:
    """One layer prefilled and decoded (at the last position) on one side x side region, scaled by the layers.

    The SRAM high-water is the larger of the two runs': the prefill's holds the prompt's KV cache and the
    prefill's buffers together, the decode's the whole KV cache.
    """
    pre, sram, skew, _ = prefill_layer(cfg, device, side, tokens=prompt_tokens, algo=algo, executor=executor)
    dec = None
    if new_tokens > 1:
        dec, dec_sram, _ = decode_layer(cfg, device, side, context=prompt_tokens + new_tokens - 1, kv=kv, algo=algo,
                                        executor=executor)
        sram = max(sram, dec_sram)
    n = cfg.n_layers
    return {
        "model": cfg.name, "device": device.name,
        "method": f"one layer measured and scaled x{n} (LM head and region hand-offs not included)",
        "side": side, "regions": None, "regions_fit": _regions_fit(device, side), "idle_cores": None,
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
        "ttft_s": device.seconds(skew + pre * n), "decode_cycles_per_token": None if dec is None else dec * n,
        "decode_tps": None if dec is None else device.clock_hz / (dec * n), "handoff_cycles_per_token": None,
        "crossing_cycles": None, "handover_cycles": None,
        "region_table": [{"region": 0, "origin": [0, 0], "layers": 1, "lm_head": False, "sram_high_water_bytes": sram,
                          "prefill_cycles": pre, "decode_cycles": dec}],
        "host_s": time.perf_counter() - t0, "decode_host_s_per_token": None,
    }
