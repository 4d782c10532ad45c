"""Heatmaps of a run's regions: per-core SRAM high-water, per-core compute cycles and bytes per link.

The data come from the tiles (``Wafer.memory``; ``Wafer.activity``, recorded with
``WaferLlama(activity=True)``):
compute cycles are what the protocols' operations charged each core (the combines inside
collectives are not counted); link bytes are those sent on the links leaving each core,
x links (toward W and E) and y links (toward N and S) summed per core as two panels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .engine import WaferLlama

PANELS = (("sram_high_water_bytes", "SRAM high-water (B)"), ("compute_cycles", "compute cycles"),
          ("link_bytes_x", "bytes on x links (W + E)"), ("link_bytes_y", "bytes on y links (N + S)"))
MOST = 64  # the JSON report keeps at most MOST x MOST cells per panel


def heatmap_data(engine: WaferLlama) -> list[dict[str, np.ndarray]]:
    """Per region: each panel's ``[y, x]`` array (the engine must record them: ``WaferLlama(activity=True)``)."""
    busy, links = engine.wafer.activity()
    high = engine.wafer.memory()[1]
    out = []
    for region in engine.wafer.regions:
        (y, x), (h, w) = region.origin, region.mesh.shape
        cut = lambda a: a[..., y : y + h, x : x + w]  # noqa: E731
        out.append({"sram_high_water_bytes": cut(high), "compute_cycles": cut(busy),
                    "link_bytes_y": cut(links[0] + links[1]), "link_bytes_x": cut(links[2] + links[3])})
    return out


def downsample(a: np.ndarray, most: int = MOST, how=np.max) -> np.ndarray:
    """``a`` reduced by ``how`` over blocks of cells, to at most ``most`` per side."""
    fy, fx = -(-a.shape[0] // most), -(-a.shape[1] // most)
    if fy == fx == 1:
        return a
    h, w = -(-a.shape[0] // fy) * fy, -(-a.shape[1] // fx) * fx
    padded = np.pad(a.astype(float), ((0, h - a.shape[0]), (0, w - a.shape[1])))
    return how(padded.reshape(h // fy, fy, w // fx, fx), axis=(1, 3))


def heatmap_json(data: list[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    """The panels for a JSON report: high-water and compute as block maxima, link bytes as block sums."""
    return [{"mesh": list(d["compute_cycles"].shape),
             **{k: downsample(d[k], how=np.sum if k.startswith("link") else np.max).tolist() for k, _ in PANELS}}
            for d in data]


def draw(data: list[dict[str, np.ndarray]], path: str | Path, sram_bytes: int, title: str = "") -> None:
    """One row of four panels per region, axes in core coordinates, the SRAM budget marked on its colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(data), len(PANELS), figsize=(4.2 * len(PANELS), 3.6 * len(data)), squeeze=False)
    for r, d in enumerate(data):
        for c, (key, label) in enumerate(PANELS):
            ax = axes[r, c]
            sram = key == "sram_high_water_bytes"
            im = ax.imshow(d[key], origin="upper", interpolation="nearest", cmap="viridis",  # others: their own range
                           vmin=0 if sram else None, vmax=sram_bytes if sram else None)
            bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            if sram:
                bar.ax.axhline(sram_bytes, color="red", linewidth=2)
                bar.set_label(f"budget {sram_bytes:,} B (red)")
            ax.set_title(f"region {r}: {label}", fontsize=9)
            ax.set_xlabel("x (core)")
            ax.set_ylabel("y (core)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
