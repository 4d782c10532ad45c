"""Calibrate the PLMR cost model on the calibration set, and only on it.

Calibration set (WaferLLM, WSE-2, float16, all LLaMA3-8B or GEMV): decode cycles per layer at
a 4K context on 420, 540 and 660 square grids (Table 4: 2699.9 / 2501.5 / 2243.3 tokens/s with
32 layers at 1.1 GHz); prefill cycles per layer for a 4096-token prompt on 480, 600 and 720
square grids (Table 3: 20320.6 / 25037.2 / 27686.5 prompt tokens/s); and the GEMV latencies of
Table 6 (1.2 us and 2.03 us for 16K and 32K square matrices; the paper does not state the grid,
720 x 720 is assumed here). Every other model's figure is a validation target and never enters
this file.

Free parameters: ``beta`` (cycles per software relay), the float16 compute rate, the call
overhead (cycles per vector instruction: a GEMV row, or one Mt-long column update of a tile
GEMM, as the CSL issues them) and the GEMM step overhead (cycles of task chaining between two
compute-shift steps of a MeshGEMM or GEMM-T). ``alpha`` = 1 cycle per hop and the 4-byte link
stay at their hardware values. Every evaluation runs the real protocols cost-only (one decoder
layer, as the paper measured, and the MeshGEMV), so the fitted numbers are what the emulator
itself predicts.

Predicted cycles are piecewise linear in z = (beta, 1 / rate, call overhead, step overhead):
linear while the critical path stays the same, with kinks where it changes. The fit is
therefore Gauss-Newton on the relative errors with a finite-difference Jacobian in z, the step
solved as a bounded linear least-squares problem and halved until the real (re-run) loss
falls. A prefill evaluation at 720 x 720 takes minutes, so this needs a handful of evaluations
where a pattern search needed dozens.

Why the step overhead: the paper's prefill cycles fall only 1.36x from 480 to 720 (2.25x the
cores); through the three rows they are A / P^2 + B * P, a cost growing with the number of
MeshGEMM steps (P per GEMM). Without it, the other three parameters reach only 26.5% rms on
the eight rows and the decode TPR stops falling with the grid; with it, the fit (two
iterations from beta 27, rate 3.344, overheads 0) reaches 10.5% rms and keeps the decode trend.
The step overhead changes neither decode nor GEMV rows (they run no compute-shift steps).

    python -m llm.calibration [--workers 2] [--rows decode,gemv,prefill]   # prints the fit
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

import numpy as np

from wafer_actors import Wafer
from wafer_actors.device import DeviceSpec, resolve
from wafer_actors.errors import InvalidArgument
from wafer_actors.ops import TensorShape, gemv

from .config import LlamaConfig, preset
from .engine import WaferLlama

CLOCK_HZ = 1.1e9
DECODE_ROWS = ((420, 2699.9), (540, 2501.5), (660, 2243.3))  # LLaMA3-8B, Table 4: (grid, tokens/s)
PREFILL_ROWS = ((480, 20320.6), (600, 25037.2), (720, 27686.5))  # LLaMA3-8B, Table 3: 4096-token prompt (grid, tokens/s)
GEMV_ROWS = ((16384, 1.2e-6), (32768, 2.03e-6))  # Table 6: (N, seconds) for [1,N] x [N,N]
GEMV_GRID = 720
CONTEXT = 4096
KINDS = ("decode", "gemv", "prefill")
ROW_KINDS = ("decode",) * len(DECODE_ROWS) + ("gemv",) * len(GEMV_ROWS) + ("prefill",) * len(PREFILL_ROWS)


def paper_cycles() -> np.ndarray:
    """The calibration targets in cycles: three decode layers, two GEMVs, three prefill layers."""
    n_layers = preset("llama3-8b").n_layers
    decode = [CLOCK_HZ / (tps * n_layers) for _, tps in DECODE_ROWS]
    prefill = [CONTEXT * CLOCK_HZ / (tps * n_layers) for _, tps in PREFILL_ROWS]
    return np.array(decode + [s * CLOCK_HZ for _, s in GEMV_ROWS] + prefill)


def row_names() -> list[str]:
    """Names of the calibration rows, in the order of ``paper_cycles``."""
    return ([f"LLaMA3-8B decode layer {g}x{g}" for g, _ in DECODE_ROWS]
            + [f"GEMV {n // 1024}K {GEMV_GRID}x{GEMV_GRID}" for n, _ in GEMV_ROWS]
            + [f"LLaMA3-8B prefill layer {g}x{g}" for g, _ in PREFILL_ROWS])


def decode_layer(cfg: LlamaConfig, device: DeviceSpec, grid: int, *, context: int = CONTEXT, kv: str = "shift",
                 algo: str = "ktree", executor: str = "fused") -> tuple[float, int, int]:
    """One decoder layer of ``cfg`` on a grid x grid region, float16, cost-only, the token at
    position ``context - 1``: (cycles, SRAM high-water bytes per core, KV slots per core)."""
    one = dataclasses.replace(cfg, n_layers=1, max_seq_len=max(cfg.max_seq_len, context))
    with WaferLlama(one, None, mesh=(grid, grid), device=device, cost_only=True, dtype="float16", lm_head=False,
                    tokens=context, kv=kv, algo=algo, transport="local", executor=executor) as m:
        m.seek(context - 1)
        _, stats = m.step(0)
        return stats.cycles, m.sram_high_water(), m.placement.cap


def prefill_layer(cfg: LlamaConfig, device: DeviceSpec, grid: int, *, tokens: int = CONTEXT,
                  executor: str = "fused") -> tuple[float, int, float, float]:
    """One decoder layer of ``cfg`` prefilling ``tokens`` tokens on a grid x grid region, float16, cost-only:
    (layer cycles, SRAM high-water bytes per core, weight skew cycles, KV hand-over + un-skew cycles)."""
    one = dataclasses.replace(cfg, n_layers=1, max_seq_len=max(cfg.max_seq_len, tokens))
    with WaferLlama(one, None, mesh=(grid, grid), device=device, cost_only=True, dtype="float16", lm_head=False,
                    tokens=tokens, prefill_tokens=tokens, transport="local", executor=executor) as m:
        _, st = m.prefill(tokens)
        return st.region_cycles[0], st.sram_high_water_bytes, st.relayout_cycles, st.handover_cycles


def gemv_cycles(device: DeviceSpec, n: int, grid: int = GEMV_GRID, algo: str = "ktree", executor: str = "fused") -> float:
    """Cycles of a float16 [1, n] x [n, n] GEMV on a grid x grid mesh, cost-only."""
    with Wafer((grid, grid), device=device, cost_only=True, executor=executor) as w:
        _, stats = gemv(w, TensorShape((n,), "float16"), TensorShape((n, n), "float16"), algo=algo)
    return stats.cycles


def _row(device: DeviceSpec, i: int) -> float:
    """Predicted cycles of calibration row ``i`` (the order of ``paper_cycles``)."""
    cfg = preset("llama3-8b")
    if i < len(DECODE_ROWS):
        return decode_layer(cfg, device, DECODE_ROWS[i][0])[0]
    i -= len(DECODE_ROWS)
    if i < len(GEMV_ROWS):
        return gemv_cycles(device, GEMV_ROWS[i][0])
    return prefill_layer(cfg, device, PREFILL_ROWS[i - len(GEMV_ROWS)][0])[0]


def selected(kinds: tuple[str, ...] = KINDS) -> list[int]:
    """Indices of the calibration rows of these kinds (``decode``, ``gemv``, ``prefill``)."""
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise InvalidArgument(f"calibration row kinds must be some of {', '.join(KINDS)}, got {', '.join(kinds) or 'none'}")
    return [i for i, k in enumerate(ROW_KINDS) if k in kinds]


def predict(device: DeviceSpec, workers: int = 1, kinds: tuple[str, ...] = KINDS) -> np.ndarray:
    """The emulator's cycles for the calibration rows of ``kinds``, in the order of ``paper_cycles``, on ``workers`` processes."""
    rows = selected(kinds)
    if workers <= 1:
        return np.array([_row(device, i) for i in rows])
    order = sorted(rows, reverse=True)  # the prefill rows, the slowest, first
    # spawned: the compiled kernels' OpenMP threads do not survive fork
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = dict(zip(order, pool.map(_row, [device] * len(order), order)))
    return np.array([done[i] for i in rows])


def params(device: DeviceSpec) -> np.ndarray:
    """The fitted parameters of ``device``: (beta, float16 FMACs per cycle, call overhead, GEMM step overhead)."""
    return np.array([device.beta, device.rate("float16"), device.call_overhead, device.gemm_step_overhead])


def with_params(base: DeviceSpec, theta: np.ndarray) -> DeviceSpec:
    """``base`` with (beta, float16 FMACs per cycle, call overhead, GEMM step overhead) = theta."""
    beta, rate16, call, step = (float(v) for v in theta)
    return base.replace(beta=beta, call_overhead=call, gemm_step_overhead=step,
                        fmacs_per_cycle={**base.fmacs_per_cycle, "float16": rate16})


def _z(theta: np.ndarray) -> np.ndarray:
    return np.array([theta[0], 1 / theta[1], *theta[2:]])


def _theta(z: np.ndarray) -> np.ndarray:
    return np.array([z[0], 1 / z[1], *z[2:]])


# beta >= alpha (the paper: alpha < beta), 0.25 <= rate <= 16 FMACs per cycle, overheads >= 0
Z_LOWER = np.array([1.0, 1 / 16, 0.0, 0.0])
Z_UPPER = np.array([np.inf, 4.0, np.inf, np.inf])
Z_STEP = np.array([2.0, 0.02, 1.0, 20.0])  # finite-difference steps in z


def bounded_lstsq(a: np.ndarray, b: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """argmin |a x - b|^2 subject to lower <= x <= upper, for a few variables: every choice of
    variables held at a bound is solved, the best feasible solution kept (x = 0 must be feasible)."""
    n = a.shape[1]
    best, best_cost = np.zeros(n), float(np.sum(b**2))
    for held in itertools.product((None, "lower", "upper"), repeat=n):
        x = np.array([0.0 if h is None else (lower if h == "lower" else upper)[j] for j, h in enumerate(held)])
        if not np.isfinite(x).all():
            continue
        free = [j for j, h in enumerate(held) if h is None]
        if free:
            x[free] = np.linalg.lstsq(a[:, free], b - a @ x, rcond=None)[0]
        if (x < lower - 1e-12).any() or (x > upper + 1e-12).any():
            continue
        cost = float(np.sum((a @ x - b) ** 2))
        if cost < best_cost:
            best, best_cost = x, cost
    return best


def fit(base: DeviceSpec | str = "wse2", *, start: tuple[float, ...] | None = None, iterations: int = 6,
        workers: int = 1, kinds: tuple[str, ...] = KINDS,
        progress: Callable[[str], None] | None = None) -> tuple[DeviceSpec, np.ndarray]:
    """Fit (beta, float16 rate, call overhead, GEMM step overhead) to the calibration rows of ``kinds``;
    return (device, their predicted cycles).

    Gauss-Newton in z = (beta, 1 / rate, call overhead, step overhead) on the relative errors: a forward
    difference per parameter gives the Jacobian, the bounded linear least-squares step is
    halved (up to four times) until the re-run loss falls; the fit stops when the step is
    negligible or no halving helps. ``start`` (default: the base device's values) only sets where it begins.
    """
    base = resolve(base)
    target = paper_cycles()[selected(kinds)]
    theta = np.array(start if start is not None else params(base), dtype=float)

    def loss(pred: np.ndarray) -> float:
        return float(np.sum((pred / target - 1) ** 2))

    def say(text: str) -> None:
        if progress:
            progress(text)

    pred = predict(with_params(base, theta), workers, kinds)
    for it in range(iterations):
        say(f"iteration {it}: {_params(theta)}; rms error {np.sqrt(loss(pred) / len(target)):.1%}")
        z = _z(theta)
        jac = np.empty((len(target), len(z)))
        for j in range(len(z)):
            zj = z.copy()
            zj[j] += Z_STEP[j]
            jac[:, j] = (predict(with_params(base, _theta(zj)), workers, kinds) - pred) / Z_STEP[j]
        dz = bounded_lstsq(jac / target[:, None], 1 - pred / target, Z_LOWER - z, Z_UPPER - z)
        if (np.abs(dz) < Z_STEP / 100).all():  # the linear model has nothing left to gain
            break
        for _ in range(5):
            trial = _theta(z + dz)
            p = predict(with_params(base, trial), workers, kinds)
            say(f"  try {_params(trial)}: rms error {np.sqrt(loss(p) / len(target)):.1%}")
            if loss(p) < loss(pred):
                theta, pred = trial, p
                break
            dz = dz / 2
        else:
            break
    return with_params(base, theta), pred


def _params(theta: np.ndarray) -> str:
    return f"beta {theta[0]:.2f}, float16 rate {theta[1]:.3f}, call overhead {theta[2]:.2f}, GEMM step overhead {theta[3]:.1f}"


def report(pred: np.ndarray, kinds: tuple[str, ...] = KINDS) -> list[str]:
    """Lines comparing predicted and paper cycles for the calibration rows of ``kinds``."""
    rows = selected(kinds)
    return [f"{row_names()[i]:<34} paper {paper_cycles()[i]:>10,.0f}  predicted {p:>10,.0f}  error {p / paper_cycles()[i] - 1:+6.1%}"
            for i, p in zip(rows, pred)]


def main() -> None:
    ap = argparse.ArgumentParser(description="Fit the wse2 preset's free parameters to the calibration set.")
    ap.add_argument("--workers", type=int, default=2, help="processes evaluating calibration rows at once")
    ap.add_argument("--rows", default=",".join(KINDS), help="kinds of calibration rows to fit (the wse2 preset fits all three)")
    args = ap.parse_args()
    kinds = tuple(k.strip() for k in args.rows.split(",") if k.strip())
    selected(kinds)  # a bad --rows fails here, before any run
    device, pred = fit(workers=args.workers, kinds=kinds, progress=lambda text: print(text, flush=True))
    print(f"fitted: {_params(params(device))}")
    print("\n".join(report(pred, kinds)))


if __name__ == "__main__":
    main()
