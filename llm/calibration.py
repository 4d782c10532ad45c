"""Calibrate the PLMR cost model on the calibration set, and only on it.

Calibration set (WaferLLM, WSE-2, float16, all LLaMA3-8B or GEMV): decode cycles per layer at
a 4K context on 420, 540 and 660 square grids (Table 4: 2699.9 / 2501.5 / 2243.3 tokens/s with
32 layers at 1.1 GHz); prefill cycles per layer for a 4096-token prompt on 480, 600 and 720
square grids (Table 3: 20320.6 / 25037.2 / 27686.5 prompt tokens/s); and the GEMV latencies of
Table 6 (1.2 us and 2.03 us for 16K and 32K square matrices; the paper does not state the grid,
720 x 720 is assumed here). Every other model's figure is a validation target and never enters
this file.

What runs: the paper kernel (``llm.paper_kernel``), the configuration the authors measured
(one head with K/V dim x dim, shapes rounded to multiples of P, their ``group_num``, q/k/v and
gate/up as separate GEMVs and GEMMs; prefill with chain allreduces), not the GQA model, so a
modelling difference does not enter the fit. The GEMV rows run without the final broadcast:
Table 6 times one GEMV, and MeshGEMV broadcasts only when another GEMV follows (paper 6.2).
Every evaluation runs the real protocols cost-only.

Fitted parameters (``PARAMS``; ``alpha`` = 1 cycle per hop and the 4-byte link stay at their
hardware values), each a cost the CSL pays where the protocols say:

* ``beta``: cycles per software relay (a core receives a wavelet, adds, forwards);
* the float16 FMAC rate of a core's vector unit;
* ``call_overhead``: cycles to issue one vector instruction;
* ``map_overhead``: cycles to set up one ``@map`` loop over a DSD (a GEMV runs one, a tile
  GEMM step one per row of its B block);
* ``task_overhead``: cycles to switch to the next task (one per compute operation, one per
  phase of a collective).

Why these: the decode rows minus their hops are nearly the same at every grid (about 8.3K
cycles per layer), which relays and compute alone (both change with P) cannot give: a fixed
cost per task (about 47 per decode layer, 3 per GEMV) can. The prefill rows minus compute and
task switches are also nearly flat (about 3.1M cycles per layer), which is a cost per row of
B in every GEMM step: the ``@map`` set-up (about 49K per prefill layer, whatever the grid).
A per-step overhead (the previous model's "GEMM step overhead", 568 cycles) grows with P
instead, and made MeshGEMM's efficiency at 720 x 720 fall to 1.2% for a 2K GEMM.

The fit is ``scipy.optimize.least_squares`` (trust-region reflective with bounds) on the
relative errors, with a forward-difference Jacobian. Predicted cycles are piecewise linear in
the parameters (linear while the critical path stays the same): the Jacobian's columns are
counts on the critical path (relay stages, tasks, maps, FMACs), and from the preset's values
(the last fit) the solver needs few evaluations, each about 11 s with two workers (the 720 x 720
prefill row the longest; 23 evaluations, under 5 minutes, from the preset).

    python -m llm.calibration [--workers 2] [--rows decode,gemv,prefill]   # prints the fit
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.optimize import least_squares

from wafer_actors import Wafer
from wafer_actors.device import DeviceSpec, resolve
from wafer_actors.errors import InvalidArgument
from wafer_actors.ops import TensorShape, gemv

from .config import LlamaConfig, preset
from .engine import WaferLlama
from .paper_kernel import check_kernel, group_num, paper_config, paper_shape

CLOCK_HZ = 1.1e9
DECODE_ROWS = ((420, 2699.9), (540, 2501.5), (660, 2243.3))  # LLaMA3-8B, Table 4: (grid, tokens/s)
PREFILL_ROWS = ((480, 20320.6), (600, 25037.2), (720, 27686.5))  # LLaMA3-8B, Table 3: 4096-token prompt (grid, tokens/s)
GEMV_ROWS = ((16384, 1.2e-6), (32768, 2.03e-6))  # Table 6: (N, seconds) for [1,N] x [N,N]
GEMV_GRID = 720
CONTEXT = 4096
REDUCED_GRID = 120  # side of the reduced prefill rows of the regression test
# What the wse2 preset predicts for the rows, in the order of ``paper_cycles`` (recorded when it
# was fitted; tests/llm/test_calibration.py fails when a change moves a row by more than 1%),
# and for the reduced prefill rows (``reduced_prefill_layer``) that stand in for the full ones
# there: both follow the same per-step costs (see ``reduced_prefill_layer``).
PRESET_CYCLES = (12686.2, 13850.5, 15251.7, 1319.9, 2232.5, 6928878.2, 5622664.7, 5085487.8)
REDUCED_PRESET_CYCLES = (1734534.7, 1126594.3, 849528.6)
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
                 algo: str = "ktree", executor: str = "fused", kernel: str = "faithful",
                 phases: list | None = None) -> tuple[float, int, int]:
    """One decoder layer of ``cfg`` on a grid x grid region, float16, cost-only, the token at
    position ``context - 1``: (cycles, SRAM high-water bytes per core, KV slots per core).
    ``phases``: a list the layer's traced phases (``RunStats.phases``) are appended to.

    ``kernel="paper"`` runs the authors' configuration instead (``llm.paper_kernel``: one
    head, rounded shapes, their ``group_num``; the context rounded up to a multiple of the grid).
    """
    group = None
    if check_kernel(kernel) == "paper":
        shape = paper_shape(cfg, grid, context)
        cfg, context, group = paper_config(cfg, shape), shape.seq_len, shape.group_num
    one = dataclasses.replace(cfg, n_layers=1, max_seq_len=max(cfg.max_seq_len, context))
    with WaferLlama(one, None, mesh=(grid, grid), device=device, cost_only=True, dtype="float16", lm_head=False,
                    tokens=context, kv=kv, algo=algo, group_num=group, transport="local", executor=executor,
                    kernel=kernel, trace=phases is not None) as m:
        m.seek(context - 1)
        _, stats = m.step(0)
        if phases is not None:
            phases += stats.phases[0]
        return stats.cycles, m.sram_high_water(), m.placement.cap


def prefill_layer(cfg: LlamaConfig, device: DeviceSpec, grid: int, *, tokens: int = CONTEXT, algo: str = "ktree",
                  executor: str = "fused", kernel: str = "faithful", phases: list | None = None
                  ) -> tuple[float, int, float, float]:
    """One decoder layer of ``cfg`` prefilling ``tokens`` tokens on a grid x grid region, float16, cost-only:
    (layer cycles, SRAM high-water bytes per core, weight skew cycles, KV hand-over + un-skew cycles).
    ``phases``: a list the layer's traced phases are appended to.

    ``kernel="paper"``: the authors' shapes (the prompt rounded up to a multiple of the grid)
    and single-phase chain allreduces; attention is dense either way in cost-only runs. ``algo``: the allreduce of
    the faithful kernel's GEMVs.
    """
    if check_kernel(kernel) == "paper":
        shape = paper_shape(cfg, grid, tokens)
        cfg, tokens, algo = paper_config(cfg, shape), shape.seq_len, "chain"
    one = dataclasses.replace(cfg, n_layers=1, max_seq_len=max(cfg.max_seq_len, tokens))
    with WaferLlama(one, None, mesh=(grid, grid), device=device, cost_only=True, dtype="float16", lm_head=False,
                    tokens=tokens, prefill_tokens=tokens, algo=algo, transport="local", executor=executor,
                    kernel=kernel, trace=phases is not None) as m:
        _, st = m.prefill(tokens)
        if phases is not None:
            phases += st.layers[0][0][2]
        return st.region_cycles[0], st.sram_high_water_bytes, st.relayout_cycles, st.handover_cycles


def gemv_cycles(device: DeviceSpec, n: int, grid: int = GEMV_GRID, algo: str = "ktree", executor: str = "fused",
                kernel: str = "faithful") -> float:
    """Cycles of a float16 [1, n] x [n, n] GEMV on a grid x grid mesh, cost-only.

    ``kernel="paper"``: n rounded up to a multiple of the grid, the authors' ``group_num``
    rule (a divisor of the grid near its square root), and no broadcast: Table 6 times one
    GEMV, and the broadcast is only needed when another GEMV follows (paper section 6.2).
    """
    group, broadcast = None, True
    if check_kernel(kernel) == "paper":
        n, broadcast = -(-n // grid) * grid, False
        group = group_num(grid) if algo == "ktree" else None
    with Wafer((grid, grid), device=device, cost_only=True, executor=executor) as w:
        _, stats = gemv(w, TensorShape((n,), "float16"), TensorShape((n, n), "float16"), algo=algo, group_num=group,
                        broadcast=broadcast)
    return stats.cycles


def reduced_prefill_layer(device: DeviceSpec, grid: int, reduced: int = REDUCED_GRID) -> float:
    """Cycles of the prefill calibration row of ``grid`` shrunk to a reduced x reduced region with the
    same per-core blocks (the paper kernel's dim, FFN and sequence per core): the same work per
    compute-shift step in fewer steps, a stand-in quick enough for a regression test. With the
    wse2 preset the full rows are 3.995, 4.991 and 5.986 times their reduced rows at 480, 600
    and 720: within 0.25% of P / reduced, the ratio of their step counts."""
    cfg = preset("llama3-8b")
    shape = paper_shape(cfg, grid)
    per_core = lambda n: n // grid * reduced  # noqa: E731
    small = dataclasses.replace(cfg, name="llama3-8b-reduced", dim=per_core(shape.dim), ffn_dim=per_core(shape.ffn_dim))
    return prefill_layer(small, device, reduced, tokens=per_core(shape.seq_len), kernel="paper")[0]


def _row(device: DeviceSpec, i: int) -> float:
    """Predicted cycles of calibration row ``i`` (the order of ``paper_cycles``), with the paper kernel."""
    cfg = preset("llama3-8b")
    if i < len(DECODE_ROWS):
        return decode_layer(cfg, device, DECODE_ROWS[i][0], kernel="paper")[0]
    i -= len(DECODE_ROWS)
    if i < len(GEMV_ROWS):
        return gemv_cycles(device, GEMV_ROWS[i][0], kernel="paper")
    return prefill_layer(cfg, device, PREFILL_ROWS[i - len(GEMV_ROWS)][0], kernel="paper")[0]


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


@dataclass(frozen=True)
class Param:
    """A fitted ``DeviceSpec`` parameter: its field (``float16`` is the float16 FMAC rate), unit and bounds."""

    field: str
    unit: str
    lower: float
    upper: float

    def get(self, device: DeviceSpec) -> float:
        return device.rate("float16") if self.field == "float16" else getattr(device, self.field)

    def set(self, device: DeviceSpec, value: float) -> DeviceSpec:
        if self.field == "float16":
            return device.replace(fmacs_per_cycle={**device.fmacs_per_cycle, "float16": float(value)})
        return device.replace(**{self.field: float(value)})


# beta >= alpha (the paper: alpha < beta); 0.25 to 16 float16 FMACs per cycle; overheads >= 0
PARAMS = (
    Param("beta", "cycles per software relay", 1.0, np.inf),
    Param("float16", "float16 FMACs per cycle", 0.25, 16.0),
    Param("call_overhead", "cycles per vector instruction", 0.0, np.inf),
    Param("map_overhead", "cycles per @map set-up", 0.0, np.inf),
    Param("task_overhead", "cycles per task switch", 0.0, np.inf),
)


def params(device: DeviceSpec) -> np.ndarray:
    """The fitted parameters of ``device``, in the order of ``PARAMS``."""
    return np.array([p.get(device) for p in PARAMS])


def with_params(base: DeviceSpec, theta: np.ndarray) -> DeviceSpec:
    """``base`` with the parameters of ``PARAMS`` set to ``theta``."""
    for p, value in zip(PARAMS, theta):
        base = p.set(base, value)
    return base


@dataclass
class Fit:
    """A calibration: the fitted device, its rows' predicted and paper cycles, and the parameters' sensitivity."""

    device: DeviceSpec
    rows: list[int]
    predicted: np.ndarray
    target: np.ndarray
    stderr: np.ndarray  # of each parameter, from the Jacobian at the optimum (inf where the rows do not fix it)
    evaluations: int

    @property
    def errors(self) -> np.ndarray:
        return self.predicted / self.target - 1


def fit(base: DeviceSpec | str = "wse2", *, start: tuple[float, ...] | None = None, workers: int = 1,
        kinds: tuple[str, ...] = KINDS, max_evaluations: int = 40,
        progress: Callable[[str], None] | None = None) -> Fit:
    """Fit ``PARAMS`` to the calibration rows of ``kinds`` by bounded least squares on the relative errors.

    ``scipy.optimize.least_squares`` (trust-region reflective, bounds) with a forward-difference
    Jacobian; every evaluation runs the real protocols cost-only. Predicted cycles are piecewise
    linear in the parameters (linear while the critical path stays the same), so the difference
    step is relative and large enough to see the slope of the piece, not rounding.
    ``start`` (default: the base device's values) only sets where the search begins;
    ``max_evaluations`` bounds the solver's own evaluations (its Jacobians cost one more per
    parameter each).
    """
    base = resolve(base)
    rows = selected(kinds)
    target = paper_cycles()[rows]
    x0 = np.array(start if start is not None else params(base), dtype=float)
    lower, upper = np.array([p.lower for p in PARAMS]), np.array([p.upper for p in PARAMS])
    x0 = np.clip(x0, lower, upper)
    seen: dict[tuple[float, ...], np.ndarray] = {}

    def residuals(theta: np.ndarray) -> np.ndarray:
        key = tuple(float(v) for v in theta)
        if key not in seen:
            seen[key] = predict(with_params(base, theta), workers, kinds)
            err = seen[key] / target - 1
            if progress:
                progress(f"evaluation {len(seen)}: {_params(theta)}; rms error {np.sqrt(np.mean(err ** 2)):.2%}")
        return seen[key] / target - 1

    sol = least_squares(residuals, x0, bounds=(lower, upper), diff_step=1e-3, x_scale="jac", max_nfev=max_evaluations)
    jac = sol.jac
    s2 = 2 * sol.cost / max(len(rows) - len(PARAMS), 1)  # residual variance
    stderr = np.sqrt(np.clip(np.diag(np.linalg.pinv(jac.T @ jac)) * s2, 0, None))
    stderr[np.abs(jac).sum(axis=0) == 0] = np.inf
    device = with_params(base, sol.x)
    return Fit(device, rows, target * (1 + sol.fun), target, stderr, len(seen))


def _params(theta: np.ndarray) -> str:
    return ", ".join(f"{p.field} {v:.4g}" for p, v in zip(PARAMS, theta))


def report(result: Fit) -> list[str]:
    """Lines with the fitted parameters (with standard errors) and every row's predicted and paper cycles."""
    lines = [f"{p.field:<20} {v:>10.4g} +- {e:<9.3g} {p.unit}" for p, v, e in zip(PARAMS, params(result.device), result.stderr)]
    lines += [f"{row_names()[i]:<34} paper {t:>10,.0f}  predicted {p:>10,.0f}  error {p / t - 1:+6.1%}"
              for i, p, t in zip(result.rows, result.predicted, result.target)]
    lines.append(f"rms error {np.sqrt(np.mean(result.errors ** 2)):.2%}, max {np.abs(result.errors).max():.2%}, "
                 f"{result.evaluations} evaluations")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description="Fit the wse2 preset's free parameters to the calibration set (paper kernel).")
    ap.add_argument("--workers", type=int, default=2, help="processes evaluating calibration rows at once")
    ap.add_argument("--rows", default=",".join(KINDS), help="kinds of calibration rows to fit (the wse2 preset fits all three)")
    ap.add_argument("--max-evaluations", type=int, default=40,
                    help="solver steps' evaluations of all rows (each Jacobian costs one more per parameter)")
    args = ap.parse_args()
    kinds = tuple(k.strip() for k in args.rows.split(",") if k.strip())
    selected(kinds)  # a bad --rows fails here, before any run
    result = fit(workers=args.workers, kinds=kinds, max_evaluations=args.max_evaluations,
                 progress=lambda text: print(text, flush=True))
    print("\n".join(report(result)))


if __name__ == "__main__":
    main()
