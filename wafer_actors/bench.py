"""Benchmarks of the mesh protocols: one configuration per row, sweeps over P, plots.

Each row holds the predicted device figures (from the virtual clocks) and the host wall
time of the emulation, under the keys the ``wafer-llm bench`` JSON output uses.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from .collectives.allreduce import allreduce_routes, run_allreduce
from .device import DeviceSpec
from .errors import InvalidArgument
from .layout import Spec
from .ops import TensorShape, gemm, gemv
from .protocol import protocol
from .utilisation import Work, utilisation
from .wafer import RunStats, Wafer


def _operand(shape: tuple[int, ...], dtype: str, cost_only: bool, rng: np.random.Generator) -> np.ndarray | TensorShape:
    if cost_only:
        return TensorShape(shape, dtype)
    return rng.standard_normal(shape).astype(dtype)


def _row(kind: str, algo: str, p: int, device: DeviceSpec, stats: RunStats, wall: float, extra: dict[str, Any],
         work: Work) -> dict[str, Any]:
    u = utilisation(work, stats.seconds, device, extra["dtype"], p * p)
    traced = {"label": f"{kind} {algo} P={p}", "cycles": stats.cycles, "phases": stats.phases} if stats.phases else {}
    return {
        "kind": kind,
        "algo": algo,
        "P": p,
        "predicted_cycles": stats.cycles,
        "predicted_us": stats.seconds * 1e6,
        "compute_cycles": stats.compute_cycles,
        "comm_cycles": stats.comm_cycles,
        "relay_stages": stats.relay_stages,
        "routes_per_core_max": stats.routes_per_core_max,
        "sram_peak_bytes_max": stats.sram_peak_bytes_max,
        "host_wall_s": wall,
        "run_wall_s": stats.host_wall_s,
        "device": device.name,
        "tile_messages": stats.counts["tile_messages"],
        **{k: u.get(k) for k in ("mbu", "mfu", "mbu_cores_used", "mfu_cores_used")},
        **extra,
        **traced,
    }


def bench_gemv(p: int, m: int, n: int, *, algo: str, device: DeviceSpec, tiles: tuple[int, int] = (1, 1), transport: str = "local",
               dtype: str = "float16", cost_only: bool = False, group_num: int | None = None, seed: int = 0,
               repeats: int = 1, executor: str = "fused", trace: bool = False) -> dict[str, Any]:
    """Run MeshGEMV (or a baseline) y = x . W with W of m x n on a P x P mesh; return its row.

    With ``repeats`` > 1 the GEMV runs again on the same wafer and ``run_wall_s`` is the
    last (warm) run's host time; ``host_wall_s`` covers everything, tile start-up included.
    ``trace``: the row also holds the run's ``phases`` (``label``, ``cycles``) for a timeline.
    """
    rng = np.random.default_rng(seed)
    x, w = _operand((m,), dtype, cost_only, rng), _operand((m, n), dtype, cost_only, rng)
    options = {"group_num": group_num} if algo == "ktree" and group_num else {}
    t0 = time.perf_counter()
    with Wafer((p, p), device=device, tiles=tiles, transport=transport, cost_only=cost_only, executor=executor) as wafer:
        wafer.trace(trace)
        for _ in range(repeats):
            y, stats = gemv(wafer, x, w, algo=algo, **options)
    wall = time.perf_counter() - t0
    extra = {"M": m, "N": n, "dtype": dtype, "cost_only": cost_only}
    if y is not None:
        ref = x.astype(np.float64) @ w.astype(np.float64)
        extra["max_abs_error"] = float(np.abs(y - ref).max())
    elem = np.dtype(dtype).itemsize
    return _row("gemv", algo, p, device, stats, wall, extra, Work(bytes=elem * (m * n + m), flops=2 * m * n))


def bench_gemm(p: int, m: int, k: int, n: int, *, algo: str, device: DeviceSpec, tiles: tuple[int, int] = (1, 1), transport: str = "local",
               dtype: str = "float16", cost_only: bool = False, relay: bool = False, seed: int = 0,
               executor: str = "fused", trace: bool = False) -> dict[str, Any]:
    """Run one GEMM C = A . B (A m x k, B k x n) on a P x P mesh with ``algo``; return its row (``trace``: with
    its phases, the alignment and each compute-shift step)."""
    rng = np.random.default_rng(seed)
    a, b = _operand((m, k), dtype, cost_only, rng), _operand((k, n), dtype, cost_only, rng)
    options: dict[str, Any] = {"transpose_b": False}
    if algo == "gemm_t":
        b = _operand((n, k), dtype, cost_only, rng)
        options = {"transpose_b": True}
    else:
        options["algo"] = algo
        if algo == "summa":
            options["relay"] = relay
    t0 = time.perf_counter()
    with Wafer((p, p), device=device, tiles=tiles, transport=transport, cost_only=cost_only, executor=executor) as wafer:
        wafer.trace(trace)
        c, stats = gemm(wafer, a, b, **options)
    wall = time.perf_counter() - t0
    ideal = m * k * n / (p * p * device.rate(dtype))  # cycles if every core computed all the time
    extra = {"M": m, "K": k, "N": n, "dtype": dtype, "cost_only": cost_only, "ideal_compute_cycles": ideal,
             "compute_efficiency": ideal / stats.cycles}
    if algo == "summa":
        extra["relay"] = relay
    if c is not None:
        ref = a.astype(np.float64) @ (b.astype(np.float64).T if algo == "gemm_t" else b.astype(np.float64))
        extra["max_abs_error"] = float(np.abs(c - ref).max())
    elem = np.dtype(dtype).itemsize
    return _row("gemm", algo, p, device, stats, wall, extra, Work(bytes=elem * (m * k + k * n), flops=2 * m * k * n))


def plot_sweep(rows: list[dict[str, Any]], path: str | Path, title: str) -> None:
    """Draw predicted latency against P, one line per algorithm, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for algo in dict.fromkeys(r["algo"] for r in rows):
        pts = sorted((r["P"], r["predicted_us"]) for r in rows if r["algo"] == algo and "error" not in r)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=algo)
    ax.set_xlabel("P (P x P cores)")
    ax.set_ylabel("predicted latency (us)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _allreduces_routes(mesh, *, count: int, buffer: str, axes: str) -> list:
    return [r for axis in sorted(set(axes)) for r in allreduce_routes(mesh, axis=axis)]


@protocol(_allreduces_routes)
async def allreduces(tile, *, count: int, buffer: str, axes: str) -> None:
    """``count`` K-tree allreduces of ``buffer``, along ``axes`` in turn (``yx``: decode's pattern, without its
    compute)."""
    for i in range(count):
        await run_allreduce(tile, buffer=buffer, axis=axes[i % len(axes)])


def bench_exchange(mesh: tuple[int, int], tiles: tuple[int, int], *, transport: str = "local", count: int = 2000,
                   block: int = 4, axes: str = "yx") -> dict[str, Any]:
    """Host time of one allreduce of a ``block``-element float32 vector per core (little data: what a tile pays per
    collective besides its loops over cores), along the ``axes`` in turn, and per tile the part of it spent running
    and waiting for others.

    Raises:
        InvalidArgument: ``count`` or ``block`` is not a positive integer, or ``axes`` is not a string of x and y.
    """
    for name, value in (("count", count), ("block", block)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgument(f"bench_exchange: {name} must be a positive integer (allreduces to time, elements a "
                                  f"core), got {value!r}")
    if not isinstance(axes, str) or not axes or set(axes) - {"x", "y"}:
        raise InvalidArgument(f"bench_exchange: axes must be the axes to allreduce along in turn, a string of x and y "
                              f"(yx, x, y), got {axes!r}")
    with Wafer(mesh, device="wse2", tiles=tiles, transport=transport) as w:
        w.load("v", np.ones((*mesh, block), np.float32), Spec("y", "x", None))
        w.run(allreduces, count=10, buffer="v", axes=axes)  # plans, compiles, connections
        t0 = time.perf_counter()
        stats = w.run(allreduces, count=count, buffer="v", axes=axes)
        wall = time.perf_counter() - t0
    return {"mesh": list(mesh), "tiles": list(tiles), "transport": transport, "us_per_allreduce": wall / count * 1e6,
            "busy_us": [(t["wall_s"] - t.get("wait_s", 0.0)) / count * 1e6 for t in stats.per_tile],
            "wait_us": [t.get("wait_s", 0.0) / count * 1e6 for t in stats.per_tile]}
