"""Calibrate the PLMR cost model on the calibration set, and only on it.

Calibration set (WaferLLM, WSE-2, float16): LLaMA3-8B decode cycles per layer at a 4K
context on 420, 540 and 660 square grids (Table 4: 2699.9 / 2501.5 / 2243.3 tokens/s with
32 layers at 1.1 GHz), and the GEMV latencies of Table 6 (1.2 us and 2.03 us for 16K and 32K
square matrices; the paper does not state the grid, 720 x 720 is assumed here). Every other
model's figure is a validation target and never enters this file.

Free parameters: ``beta`` (cycles per software relay), the float16 compute rate and the
per-call overhead. ``alpha`` = 1 cycle per hop and the 4-byte link stay at their hardware
values. The fit is a pattern search on relative errors: every evaluation runs the real
protocols cost-only (one decoder layer, as the paper measured, and the MeshGEMV), so the
fitted numbers are what the emulator itself predicts.

    python -m llm.calibration        # prints the fit; the result is copied into the wse2 preset
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from wafer_actors import Wafer
from wafer_actors.device import DeviceSpec, resolve
from wafer_actors.ops import TensorShape, gemv

from .config import LlamaConfig, preset
from .engine import WaferLlama

CLOCK_HZ = 1.1e9
DECODE_ROWS = ((420, 2699.9), (540, 2501.5), (660, 2243.3))  # LLaMA3-8B, Table 4: (grid, tokens/s)
PREFILL_ROWS = ((480, 20320.6), (600, 25037.2), (720, 27686.5))  # LLaMA3-8B, Table 3: 4096-token prompt (grid, tokens/s)
GEMV_ROWS = ((16384, 1.2e-6), (32768, 2.03e-6))  # Table 6: (N, seconds) for [1,N] x [N,N]
GEMV_GRID = 720
CONTEXT = 4096


def paper_cycles() -> np.ndarray:
    """The calibration targets in cycles: three decode layers, then the two GEMVs."""
    n_layers = preset("llama3-8b").n_layers
    decode = [CLOCK_HZ / (tps * n_layers) for _, tps in DECODE_ROWS]
    return np.array(decode + [s * CLOCK_HZ for _, s in GEMV_ROWS])


def decode_layer(cfg: LlamaConfig, device: DeviceSpec, grid: int, *, context: int = CONTEXT, kv: str = "shift",
                 algo: str = "ktree") -> tuple[float, int, int]:
    """One decoder layer of ``cfg`` on a grid x grid region, float16, cost-only, the token at
    position ``context - 1``: (cycles, SRAM high-water bytes per core, KV slots per core)."""
    one = dataclasses.replace(cfg, n_layers=1, max_seq_len=max(cfg.max_seq_len, context))
    with WaferLlama(one, None, mesh=(grid, grid), device=device, cost_only=True, dtype="float16", lm_head=False,
                    tokens=context, kv=kv, algo=algo, transport="local") as m:
        m.seek(context - 1)
        _, stats = m.step(0)
        return stats.cycles, m.sram_high_water(), m.placement.cap


def prefill_layer(cfg: LlamaConfig, device: DeviceSpec, grid: int, *, tokens: int = CONTEXT) -> tuple[float, int, float, float]:
    """One decoder layer of ``cfg`` prefilling ``tokens`` tokens on a grid x grid region, float16, cost-only:
    (layer cycles, SRAM high-water bytes per core, weight skew cycles, KV hand-over + un-skew cycles)."""
    one = dataclasses.replace(cfg, n_layers=1, max_seq_len=max(cfg.max_seq_len, tokens))
    with WaferLlama(one, None, mesh=(grid, grid), device=device, cost_only=True, dtype="float16", lm_head=False,
                    tokens=tokens, prefill_tokens=tokens, transport="local") as m:
        _, st = m.prefill(tokens)
        return st.region_cycles[0], st.sram_high_water_bytes, st.relayout_cycles, st.handover_cycles


def gemv_cycles(device: DeviceSpec, n: int, grid: int = GEMV_GRID, algo: str = "ktree") -> float:
    """Cycles of a float16 [1, n] x [n, n] GEMV on a grid x grid mesh, cost-only."""
    with Wafer((grid, grid), device=device, cost_only=True) as w:
        _, stats = gemv(w, TensorShape((n,), "float16"), TensorShape((n, n), "float16"), algo=algo)
    return stats.cycles


def predict(device: DeviceSpec) -> np.ndarray:
    """The emulator's cycles for the calibration set, in the order of ``paper_cycles``."""
    cfg = preset("llama3-8b")
    decode = [decode_layer(cfg, device, grid)[0] for grid, _ in DECODE_ROWS]
    return np.array(decode + [gemv_cycles(device, n) for n, _ in GEMV_ROWS])


def with_params(base: DeviceSpec, theta: np.ndarray) -> DeviceSpec:
    """``base`` with (beta, float16 FMACs per cycle, call overhead) = theta."""
    beta, rate16, overhead = (float(v) for v in theta)
    return base.replace(beta=beta, call_overhead=overhead, fmacs_per_cycle={**base.fmacs_per_cycle, "float16": rate16})


def fit(base: DeviceSpec | str = "wse2", *, start: tuple[float, float, float] | None = None, rounds: int = 12,
        progress: Callable[[int, np.ndarray, np.ndarray], None] | None = None) -> tuple[DeviceSpec, np.ndarray]:
    """Fit (beta, float16 rate, call overhead) to the calibration set; return (device, predicted cycles).

    A pattern search on the sum of squared relative errors: try each parameter one step up
    and down, keep the first improvement, halve the steps when none improves. (Predicted
    cycles are piecewise linear in the parameters, with kinks where the critical path
    changes, so a derivative-free search is the robust choice.) ``start`` (default: the
    base device's values) only sets where the search begins.
    """
    base = resolve(base)
    target = paper_cycles()
    theta = np.array(start if start is not None else [base.beta, base.rate("float16"), base.call_overhead], dtype=float)
    lower = np.array([0.0, 0.25, 0.0])
    steps = np.array([4.0, 0.5, 2.0])
    smallest = steps / 16

    def loss(pred: np.ndarray) -> float:
        return float(np.sum((pred / target - 1) ** 2))

    pred = predict(with_params(base, theta))
    for it in range(rounds):
        if progress:
            progress(it, theta, pred)
        improved = False
        for j in range(len(theta)):
            for sign in (1, -1):
                t = theta.copy()
                t[j] = max(lower[j], t[j] + sign * steps[j])
                if t[j] == theta[j]:
                    continue
                p = predict(with_params(base, t))
                if loss(p) < loss(pred):
                    theta, pred, improved = t, p, True
                    break
        if not improved:
            steps = steps / 2
            if (steps < smallest).all():
                break
    return with_params(base, theta), pred


def report(pred: np.ndarray) -> list[str]:
    """Lines comparing predicted and paper cycles for the calibration set."""
    target = paper_cycles()
    names = [f"LLaMA3-8B decode layer {g}x{g}" for g, _ in DECODE_ROWS] + [f"GEMV {n // 1024}K {GEMV_GRID}x{GEMV_GRID}" for n, _ in GEMV_ROWS]
    return [f"{n:<32} paper {t:>8,.0f}  predicted {p:>8,.0f}  error {p / t - 1:+6.1%}" for n, t, p in zip(names, target, pred)]


def main() -> None:
    def progress(it: int, theta: np.ndarray, pred: np.ndarray) -> None:
        err = pred / paper_cycles() - 1
        print(f"round {it}: beta {theta[0]:.2f}, float16 rate {theta[1]:.3f}, call overhead {theta[2]:.2f}; "
              f"rms error {np.sqrt(np.mean(err**2)):.1%}", flush=True)

    # a coarse look at the error surface put the search's start near beta 30, two float16 FMACs per cycle
    device, pred = fit(start=(30.0, 2.0, 0.0), progress=progress)
    print(f"fitted: beta {device.beta:.2f}, fmacs_per_cycle float16 {device.rate('float16'):.3f}, call_overhead {device.call_overhead:.2f}")
    print("\n".join(report(pred)))


if __name__ == "__main__":
    main()
