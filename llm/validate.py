"""The validation report: predictions of the calibrated cost model at the paper's settings.

Decode rows follow the paper's measurement: one decoder layer at a 4K context on a P x P
region (float16, cost-only, the same protocols and per-core memory and routing checks as
full numerics), scaled by the number of layers: TPR = clock / (cycles per layer x layers).
Each row also says how many P x P regions the whole model needs and the hand-off cycles
between them per token (not in the paper's TPR). Only LLaMA3-8B's decode rows carry the
paper's figure: they are the calibration set.

Prefill rows measure one decoder layer prefilling a 4K prompt on a P x P region the same way
(``llm.prefill_protocol``: MeshGEMM and GEMM-T on skewed operands), with TPR = prompt tokens
x clock / (cycles per layer x layers), the paper's prefill TPR; the weight skew before and the
KV hand-over after are reported beside it, per layer, not in the TPR. Only LLaMA3-8B's
prefill rows carry the paper's figure: they are in the calibration set too.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import partial
from typing import Any, Callable

from wafer_actors import Wafer
from wafer_actors.device import DeviceSpec
from wafer_actors.errors import RoutingError
from wafer_actors.ops import TensorShape, gemm
from wafer_actors.utilisation import Work, utilisation

from .calibration import (
    CONTEXT,
    DECODE_ROWS,
    PREFILL_ROWS,
    decode_layer,
    gemv_cycles,
    prefill_layer,
)
from .config import preset
from .paper_kernel import KERNELS, check_kernel, paper_config, paper_shape
from .placement import PlacementError, place, place_unbounded
from .utilisation import decode_work, prefill_work

MODELS = ("llama3-8b", "llama2-13b", "codellama-34b", "qwen2-72b")
DECODE_GRIDS = (420, 540, 660)
PREFILL_GRIDS = (480, 600, 720)
PAPER_TPS = {("llama3-8b", "decode", g): tps for g, tps in DECODE_ROWS}
PAPER_TPS.update({("llama3-8b", "prefill", g): tps for g, tps in PREFILL_ROWS})


def _shapes(model: str, grid: int, kernel: str):
    """The model as ``kernel`` runs it on a grid x grid region (``llm.paper_kernel``)."""
    cfg = preset(model)
    return cfg if kernel == "faithful" else paper_config(cfg, paper_shape(cfg, grid))


def decode_row(model: str, device: DeviceSpec, grid: int, executor: str = "fused", kernel: str = "faithful",
               trace: bool = False) -> dict[str, Any]:
    """One decode row: predicted cycles per layer and tokens/s, memory, regions and hand-off (``trace``: and the
    layer's phases)."""
    cfg = preset(model)
    phases = [] if trace else None
    cycles, sram, _ = decode_layer(cfg, device, grid, executor=executor, kernel=kernel, phases=phases)
    shaped = _shapes(model, grid, kernel)
    regions, fits = _regions(shaped, device, grid, CONTEXT, 0)
    hop = transfer_cycles(device, grid, math.ceil(shaped.dim / grid) * 2)
    handoff = None if regions is None else (regions - 1) * hop
    paper = PAPER_TPS.get((model, "decode", grid))
    tps = device.clock_hz / (cycles * cfg.n_layers)
    return {
        **_utilisation(decode_work(cfg, CONTEXT, 2), 1 / tps, device, regions, grid),
        "model": model, "phase": "decode", "kernel": kernel, "grid": grid, "context": CONTEXT,
        "predicted_cycles_per_layer": cycles, "predicted_tps": tps, "paper_tps": paper,
        "error": None if paper is None else tps / paper - 1,
        "sram_high_water_bytes": sram, "sram_bytes": device.sram_bytes,
        "regions_needed": regions, "fits_wafer": fits, "handoff_cycles_per_token": handoff,
        "note": "one layer measured and scaled" + _fit_note(regions, fits),
        **_traced(phases, f"{model} {kernel} decode {grid}x{grid}", cycles),
    }


def transfer_cycles(device: DeviceSpec, grid: int, block_bytes: int, load: int = 1) -> float:
    """From its sources' clocks, a hand-off between two grid x grid regions side by side: ``grid`` hops to the far
    core and one block through each link, ``load`` blocks where that many flows share one (the closed form of
    ``llm.regions``' transfers, which ``tests/llm/test_regions.py`` checks a run lands at). A row measures one
    layer, not a wafer of regions, so this stands in for the run."""
    return grid * device.alpha + load * block_bytes / device.link_bytes_per_cycle


def _regions(cfg, device: DeviceSpec, grid: int, tokens: int, prefill_tokens: int) -> tuple[int | None, bool]:
    """(grid x grid regions the whole model needs, float16, or None when the LM head and a layer
    do not fit one region together; whether that many fit the wafer)."""
    try:
        regions = len(place_unbounded(cfg, device, grid, tokens=tokens, prefill_tokens=prefill_tokens, elem_bytes=2).regions)
    except PlacementError:
        return None, False
    return regions, regions <= (device.height // grid) * (device.width // grid)


def _utilisation(work: Work, seconds: float, device: DeviceSpec, regions: int | None, grid: int) -> dict[str, float]:
    """MBU and MFU of the real model's work (float16) in the predicted time, for the wafer and the regions it needs."""
    u = utilisation(work, seconds, device, "float16", (regions or 1) * grid * grid)
    return {k: u[k] for k in ("mbu", "mfu", "mbu_cores_used", "mfu_cores_used")}


def _traced(phases: list | None, label: str, cycles: float) -> dict[str, Any]:
    """What a row carries for ``llm.trace.rows_trace`` when traced."""
    return {} if phases is None else {"label": label, "cycles": cycles, "phases": phases}


def _fit_note(regions: int | None, fits: bool) -> str:
    if regions is None:
        return "; the LM head does not fit a region with a layer"
    return "" if fits else "; the whole model exceeds the wafer at this grid"


def prefill_row(model: str, device: DeviceSpec, grid: int, tokens: int = CONTEXT, executor: str = "fused",
                kernel: str = "faithful", trace: bool = False) -> dict[str, Any]:
    """One prefill row: predicted cycles per layer and prompt tokens/s for a ``tokens``-token prompt (``trace``: and
    the layer's phases)."""
    cfg = preset(model)
    phases = [] if trace else None
    cycles, sram, skew, handover = prefill_layer(cfg, device, grid, tokens=tokens, executor=executor, kernel=kernel,
                                                 phases=phases)
    shaped = _shapes(model, grid, kernel)
    regions, fits = _regions(shaped, device, grid, tokens, tokens)
    crossing = transfer_cycles(device, grid, -(-tokens // grid) * math.ceil(shaped.dim / grid) * 2, grid)
    paper = PAPER_TPS.get((model, "prefill", grid)) if tokens == CONTEXT else None
    tps = tokens * device.clock_hz / (cycles * cfg.n_layers)
    return {
        **_utilisation(prefill_work(cfg, tokens, 2), tokens / tps, device, regions, grid),
        "model": model, "phase": "prefill", "kernel": kernel, "grid": grid, "context": tokens,
        "predicted_cycles_per_layer": cycles, "predicted_tps": tps, "paper_tps": paper,
        "error": None if paper is None else tps / paper - 1,
        "sram_high_water_bytes": sram, "sram_bytes": device.sram_bytes,
        "regions_needed": regions, "fits_wafer": fits,
        "crossing_cycles": None if regions is None else (regions - 1) * crossing,
        "skew_cycles_per_layer": skew, "handover_cycles_per_layer": handover,
        "note": f"one layer measured and scaled; weight skew {skew:,.0f} and KV hand-over {handover:,.0f} cycles per layer "
                "and the prompt's region crossings not in TPR" + _fit_note(regions, fits),
        **_traced(phases, f"{model} {kernel} prefill {grid}x{grid}", cycles),
    }


def gemv_rows(device: DeviceSpec, grid: int, sizes: tuple[int, ...], executor: str = "fused") -> list[dict[str, Any]]:
    """MeshGEMV (K-tree) against the pipeline allreduce GEMV at ``grid``."""
    rows = []
    for n in sizes:
        t0 = time.perf_counter()
        ktree, pipe = gemv_cycles(device, n, grid, "ktree", executor), gemv_cycles(device, n, grid, "pipeline", executor)
        rows.append({"kind": "gemv", "N": n, "grid": grid, "meshgemv_cycles": ktree, "pipeline_cycles": pipe, "ratio": pipe / ktree,
                     "host_s": time.perf_counter() - t0})
    return rows


def _gemm_row(device: DeviceSpec, grid: int, n: int, algo: str, relay: bool, executor: str) -> dict[str, Any]:
    """One float16 n x n x n GEMM on a grid x grid mesh, cost-only: cycles, compute efficiency, host seconds."""
    name = algo + (" relay" if relay else "")
    t0 = time.perf_counter()
    with Wafer((grid, grid), device=device, cost_only=True, executor=executor) as w:
        try:
            _, st = gemm(w, TensorShape((n, n), "float16"), TensorShape((n, n), "float16"), algo=algo,
                         **({"relay": True} if relay else {}))
        except RoutingError as err:
            return {"kind": "gemm", "algo": name, "grid": grid, "N": n, "failed": str(err)}
    ideal = math.ceil(n / grid) ** 3 * grid / device.rate("float16")
    return {"kind": "gemm", "algo": name, "grid": grid, "N": n, "cycles": st.cycles, "efficiency": ideal / st.cycles,
            "host_s": time.perf_counter() - t0}


def gemm_rows(device: DeviceSpec, grid: int, n: int, executor: str = "fused") -> list[dict[str, Any]]:
    """MeshGEMM against Cannon and SUMMA (relayed broadcasts when SUMMA runs out of routes) at ``grid``."""
    return [_gemm_row(device, grid, n, algo, relay, executor)
            for algo, relay in (("meshgemm", False), ("cannon", False), ("summa", False), ("summa", True))]


FIG9_EFFICIENCY = "MeshGEMM keeps > 70% compute efficiency near 720 x 720; SUMMA and Cannon fall below 50% at 720 x 720"
FIG9_LATENCY = "GEMM 2K from 360 x 360 to 720 x 720: SUMMA's and Cannon's latency grows, MeshGEMM's stays about the same"


def fig9_rows(device: DeviceSpec, grid: int, n: int, executor: str = "fused") -> list[dict[str, Any]]:
    """Fig. 9's shape, a check that is not fitted: MeshGEMM's compute efficiency at ``grid`` for n, 2n
    and 4n GEMMs, and the n GEMM's latency on grid / 2 to grid (four grids) for MeshGEMM, Cannon and
    SUMMA, each row with the paper's statement (the figure's values are not in its text)."""
    rows = [{**_gemm_row(device, grid, size, "meshgemm", False, executor), "kind": "fig9_efficiency", "paper": FIG9_EFFICIENCY}
            for size in (n, 2 * n, 4 * n)]
    for g in sorted({grid // 2 + i * (grid - grid // 2) // 3 for i in range(4)}):
        for algo in ("meshgemm", "cannon", "summa"):
            row = _gemm_row(device, g, n, algo, False, executor)
            if "failed" in row and algo == "summa":  # out of routes: relay the broadcasts
                row = _gemm_row(device, g, n, algo, True, executor)
            rows.append({**row, "kind": "fig9_latency", "paper": FIG9_LATENCY})
    return rows


def kv_capacity(device: DeviceSpec, grid: int = 360) -> dict[str, Any]:
    """Tokens the KV cache of LLaMA3-8B holds (float16) on the wafer's grid x grid regions, shift vs concat."""
    cfg = dataclasses.replace(preset("llama3-8b"), max_seq_len=10**9)
    regions = min((device.height // grid) * (device.width // grid), cfg.n_layers)
    try:
        caps = {kv: place(cfg, device, grid, grid, kv_mode=kv, regions=regions, elem_bytes=2).capacity() for kv in ("concat", "shift")}
    except PlacementError as err:
        return {"kind": "kv_capacity", "model": "llama3-8b", "grid": grid, "regions": regions, "failed": str(err)}
    return {"kind": "kv_capacity", "model": "llama3-8b", "grid": grid, "regions": regions, **caps, "ratio": caps["shift"] / caps["concat"]}


def model_row(phase: str, model: str, device: DeviceSpec, grid: int, tokens: int = CONTEXT, executor: str = "fused",
              kernel: str = "faithful", trace: bool = False) -> dict[str, Any]:
    """A decode or prefill row (with the host seconds it took), or the reason one layer does not fit the grid."""
    t0 = time.perf_counter()
    try:
        if phase == "decode":
            row = decode_row(model, device, grid, executor, kernel, trace)
        else:
            row = prefill_row(model, device, grid, tokens, executor, kernel, trace)
    except PlacementError as err:
        return {"model": model, "phase": phase, "kernel": kernel, "grid": grid, "failed": str(err)}
    return {**row, "host_s": time.perf_counter() - t0, "executor": executor}


def run(device: DeviceSpec, *, models=MODELS, grids=DECODE_GRIDS, prefill_grids=PREFILL_GRIDS, prefill_tokens: int = CONTEXT,
        gemv_grid: int = 720, gemv_sizes=(16384, 32768), gemm_grid: int | None = 720, gemm_n: int = 2048, kv_grid: int = 360,
        workers: int = 1, executor: str = "fused", kernels: tuple[str, ...] = KERNELS,
        progress: Callable[[str], None] | None = None, trace: bool = False) -> list[dict[str, Any]]:
    """Every row of the report, in order: decode and prefill rows of each kernel, GEMV ratios, GEMM comparison,
    the Fig. 9 check, KV capacity.

    ``workers`` > 1 computes the rows on that many processes (each row is an independent run). ``trace``: the
    decode and prefill rows carry their layer's phases (``llm.trace.rows_trace``).
    """
    jobs: list[tuple[str, Callable[[], Any]]] = []
    for model in models:
        for kernel in map(check_kernel, kernels):
            jobs += [(f"{model} {kernel} decode {g}x{g}",
                      partial(model_row, "decode", model, device, g, CONTEXT, executor, kernel, trace)) for g in grids]
            jobs += [(f"{model} {kernel} prefill {g}x{g}",
                      partial(model_row, "prefill", model, device, g, prefill_tokens, executor, kernel, trace)) for g in prefill_grids]
    if gemv_sizes:
        jobs.append((f"GEMV {gemv_grid}x{gemv_grid}", partial(gemv_rows, device, gemv_grid, tuple(gemv_sizes), executor)))
    if gemm_grid:
        jobs.append((f"GEMM {gemm_grid}x{gemm_grid}", partial(gemm_rows, device, gemm_grid, gemm_n, executor)))
        jobs.append(("Fig. 9 check", partial(fig9_rows, device, gemm_grid, gemm_n, executor)))
    jobs.append(("KV capacity", partial(kv_capacity, device, kv_grid)))

    def done(what: str) -> None:
        if progress:
            progress(what)

    results: list[Any] = [None] * len(jobs)
    if workers <= 1:
        for i, (what, job) in enumerate(jobs):
            results[i] = job()
            done(what)
    else:
        # spawned: the compiled kernels' OpenMP threads do not survive fork
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(job): i for i, (_, job) in enumerate(jobs)}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                done(jobs[futures[fut]][0])
    rows = []
    for r in results:
        rows += r if isinstance(r, list) else [r]
    return rows


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Predicted tokens/s against the grid, decode and prefill side by side, per model, with the paper's calibration points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, phase in zip(axes, ("decode", "prefill")):
        done = [r for r in rows if r.get("phase") == phase and "failed" not in r]
        for model in dict.fromkeys(r["model"] for r in done):
            for kernel, style in (("paper", "--"), ("faithful", "-")):
                rs = [r for r in done if r["model"] == model and r["kernel"] == kernel]
                if rs:
                    ax.plot([r["grid"] for r in rs], [r["predicted_tps"] for r in rs], style, marker="o",
                            label=f"{model} {kernel} kernel")
            paper = {r["grid"]: r["paper_tps"] for r in done if r["model"] == model and r["paper_tps"]}
            if paper:
                ax.plot(list(paper), list(paper.values()), "k*", markersize=10, label=f"{model} paper (calibration)")
        ax.set_xlabel(f"{phase} grid P (P x P cores)")
        ax.set_ylabel("tokens/s per request" if phase == "decode" else "prompt tokens/s")
        ax.set_title(f"{phase.capitalize()} on WSE-2, 4K: predicted vs paper")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
