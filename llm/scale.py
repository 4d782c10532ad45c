"""Scaling experiments: the same workload on more tile actors (strong) or a mesh that grows
with them (weak), on whatever Ray cluster the driver is connected to.

For every point: host wall time of the workload itself (``wall_s``; starting the actors and
loading the operands is ``setup_s``), speedup and efficiency against the first point, actor
messages and bytes inside a node and across nodes, per-node and per-tile statistics
(messages, bytes, seconds computing vs waiting), and an invariance check: with the same
mesh (strong) the result and the predicted cycles must not change with the tiling; with a
growing mesh (weak) the result must match NumPy (GEMV/GEMM) or the reference (decode).

Decode runs a checkpoint (the default model unless told otherwise) or, with ``random:PRESET``,
seeded weights of a preset's shape (``llm.config.PRESETS``), optionally cut to its first layers:
a LLaMA-shaped model sized to keep a many-core machine busy, without a download.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections import defaultdict
from typing import Any, Callable

import numpy as np
import psutil

from wafer_actors import Wafer
from wafer_actors.device import preset as preset_device
from wafer_actors.errors import InvalidArgument
from wafer_actors.ops import gemm, gemv

from .checkpoint import LlamaWeights, random_weights
from .config import LlamaConfig, preset
from .models import DEFAULT_MODEL, load_model
from .placement import PlacementError, default_mesh, place

WORKLOADS = ("gemv", "gemm", "decode")
MODES = ("strong", "weak")


def tile_grid(n: int) -> tuple[int, int]:
    """The most square rows x cols with rows * cols = n (rows <= cols)."""
    rows = max(r for r in range(1, int(math.isqrt(n)) + 1) if n % r == 0)
    return rows, n // rows


def _digest(a: np.ndarray | list[int]) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def _node_stats(per_tile: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    keys = ("tile_messages", "tile_bytes", "node_messages", "node_bytes", "wall_s", "wait_s")
    out: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(keys, 0))
    for t in per_tile:
        for k in keys:
            out[t["node"]][k] += t.get(k, 0)
    return dict(out)


def _matrix_point(workload: str, side: int, tiles: tuple[int, int], per_core: int, seed: int, executor: str) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    n = side * per_core
    t0 = time.perf_counter()
    with Wafer((side, side), tiles=tiles, transport="ray", executor=executor) as wafer:
        if workload == "gemv":
            x, w = rng.standard_normal(n).astype(np.float32), rng.standard_normal((n, n)).astype(np.float32)
            out, stats = gemv(wafer, x, w)
            expected = x @ w
        else:
            a, b = rng.standard_normal((n, n)).astype(np.float32), rng.standard_normal((n, n)).astype(np.float32)
            out, stats = gemm(wafer, a, b)
            expected = a @ b
        nodes = wafer.nodes()
    total = time.perf_counter() - t0
    per_tile = [{"tile": i, "node": nodes[i], **d} for i, d in enumerate(stats.per_tile)]
    return {"cycles": stats.cycles, "digest": _digest(out), "matches_reference": bool(np.allclose(out, expected, rtol=1e-3, atol=1e-3)),
            "counts": stats.counts, "per_tile": per_tile, "wall_s": stats.host_wall_s, "setup_s": total - stats.host_wall_s, "size": n}


RANDOM = "random:"
PROMPT = "The capital of France is"


def decode_model(model: str = DEFAULT_MODEL, layers: int | None = None, seed: int = 0, *, tokens: int = 3,
                 side: int | None = None) -> tuple[LlamaConfig, LlamaWeights, list[int], int]:
    """The decode workload's model, prompt ids and mesh side: a checkpoint (as ``load_model`` reads it) with
    ``PROMPT``, or ``random:PRESET``: weights of the preset's shape drawn with ``seed``, its first ``layers`` layers
    (default all), prompted with 5 token ids drawn with it. The side is ``side`` (checked to hold the model and the
    KV entries of the prompt and ``tokens`` new tokens), or that of the smallest square region of the wafer that
    holds them; a random model's is found, and its bytes checked against this machine's free memory, before its
    weights are drawn.

    Raises:
        InvalidArgument: an unknown preset, ``layers`` outside 1..the preset's layers, ``layers`` with a checkpoint,
            a converted checkpoint or one without a tokenizer, a random model larger than the free memory.
        PlacementError: regions of ``side`` do not hold the model, or (no ``side``) no square region of the wafer does.
    """
    if not model.startswith(RANDOM):
        if layers is not None:
            raise InvalidArgument(f"layers cuts a random model (random:PRESET), not the checkpoint {model!r}")
        cfg, w, tok = load_model(model)
        if not isinstance(w, LlamaWeights):
            raise InvalidArgument(f"{model} is a converted checkpoint, whose tiles read their shards: decode checks its "
                                  f"tokens against the NumPy reference, which needs the weights (give the .gguf file or "
                                  f"Hugging Face directory it was converted from)")
        if tok is None:
            raise InvalidArgument(f"{model} has no tokenizer to encode the prompt; give random:PRESET or a "
                                  f"checkpoint with one")
        prompt = tok.encode(PROMPT)
        return cfg, w, prompt, _region_side(cfg, len(prompt) + tokens, side)
    cfg = preset(model[len(RANDOM):])
    if layers is not None:
        if not isinstance(layers, int) or not 1 <= layers <= cfg.n_layers:
            raise InvalidArgument(f"layers must be an integer in [1, {cfg.n_layers}] for {cfg.name}, got {layers!r}")
        cfg = dataclasses.replace(cfg, n_layers=layers)
    rng = np.random.default_rng(seed)
    prompt = [int(t) for t in rng.integers(0, cfg.vocab_size, 5)]
    side = _region_side(cfg, len(prompt) + tokens, side)
    # float32 weights, and the largest array while it is drawn in float64 (the embedding, or a stack of FFN matrices)
    need = 4 * cfg.n_params() + 8 * max(cfg.vocab_size * cfg.dim, cfg.n_layers * cfg.dim * cfg.ffn_dim)
    free = psutil.virtual_memory().available
    if need > free:
        raise InvalidArgument(f"{model} with {cfg.n_layers} layers needs {need / 2**30:.1f} GiB to draw its weights; "
                              f"this machine has {free / 2**30:.1f} GiB free: keep fewer layers (--layers)")
    return cfg, random_weights(cfg, seed), prompt, side


def _region_side(cfg: LlamaConfig, tokens: int, side: int | None) -> int:
    """``side``, checked to hold ``cfg`` with ``tokens`` KV entries in regions of side x side cores of the wafer,
    or the side of the smallest square region that holds it alone."""
    wse2 = preset_device("wse2")  # what the engine runs on by default
    try:
        if side is None:
            return default_mesh(cfg, wse2, tokens)[0]
        place(cfg, wse2, side, side, tokens=tokens)
        return side
    except PlacementError as err:  # its message names generate's --mesh, scale's --mesh-side
        why = str(err).replace("--mesh", "--mesh-side") if side else (
            f"no square region of the {wse2.name} wafer holds {cfg.name} with {cfg.n_layers} layers; give a mesh side "
            f"(--mesh-side), whose regions then share the layers")
        raise PlacementError(why) from None


def _decode_point(side: int, tiles: tuple[int, int], tokens: int, model, executor: str) -> dict[str, Any]:
    from .engine import WaferLlama
    from .generate import generate
    from .reference import ReferenceModel

    cfg, w, prompt = model
    t0 = time.perf_counter()
    with WaferLlama(cfg, w, mesh=(side, side), tiles=tiles, transport="ray", tokens=len(prompt) + tokens, executor=executor) as m:
        out = generate(m, prompt, max_new_tokens=tokens)
        steps = m.totals.steps
    total = time.perf_counter() - t0
    wall = sum(st.host_s for st in steps)
    ref = ReferenceModel(cfg, w, len(prompt) + tokens)
    ids = []
    for i, t in enumerate(prompt + out.output_ids[:-1]):
        logits = ref.forward(t, i)
        if i >= len(prompt) - 1:
            ids.append(int(np.argmax(logits)))
    counts: dict[str, int] = defaultdict(int)
    for st in steps:
        for k, v in st.counts.items():
            counts[k] += v
    return {"cycles": sum(st.cycles for st in steps) / len(steps), "digest": _digest(out.output_ids),
            "matches_reference": ids == out.output_ids, "counts": dict(counts),
            "per_tile": [t for st in steps for t in st.per_tile], "wall_s": wall, "setup_s": total - wall, "size": side}


def run(mode: str, counts: list[int], workload: str, *, side: int | None = None, per_core: int = 8, tokens: int = 3,
        seed: int = 0, executor: str = "fused", model: str = DEFAULT_MODEL, layers: int | None = None,
        progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """One row per tile count; ``side`` is the mesh side at the first count (weak mode grows it as sqrt; default
    32, and for decode the smallest square region of the wafer that holds the model); decode runs ``model``
    (``decode_model``: a checkpoint, or ``random:PRESET`` cut to ``layers``)."""
    if mode not in MODES:
        raise InvalidArgument(f"mode must be one of {MODES}, got {mode!r}")
    if workload not in WORKLOADS:
        raise InvalidArgument(f"workload must be one of {WORKLOADS}, got {workload!r}")
    if not counts or any(not isinstance(c, int) or c < 1 for c in counts):
        raise InvalidArgument(f"tile counts must be positive integers, got {counts!r}")
    if workload != "decode" and (model != DEFAULT_MODEL or layers is not None):
        raise InvalidArgument(f"a model and its layers choose what decode runs; the {workload} workload takes neither")
    decoded = None
    if workload == "decode":
        cfg, w, prompt, side = decode_model(model, layers, seed, tokens=tokens, side=side)
        decoded = (cfg, w, prompt)
    if side is None:
        side = 32
    import ray

    from wafer_actors.fabric.ray import start_local_ray

    if not ray.is_initialized():  # start Ray once, outside the timed points
        start_local_ray()
    rows = []
    for c in counts:
        tiles = tile_grid(c)
        grow = math.sqrt(c / counts[0]) if mode == "weak" else 1.0
        s = max(tiles[0], tiles[1], int(round(side * grow / 8)) * 8) if mode == "weak" else side
        if workload == "decode":
            point = _decode_point(s, tiles, tokens, decoded, executor)
        else:
            point = _matrix_point(workload, s, tiles, per_core, seed, executor)
        cnt = point.pop("counts")
        row = {"mode": mode, "workload": workload, "tiles": c, "tile_grid": list(tiles), "mesh": [s, s], **point,
               "nodes": len({t["node"] for t in point["per_tile"]}),
               "messages_inside_nodes": cnt.get("tile_messages", 0) - cnt.get("node_messages", 0),
               "messages_across_nodes": cnt.get("node_messages", 0),
               "bytes_inside_nodes": cnt.get("tile_bytes", 0) - cnt.get("node_bytes", 0),
               "bytes_across_nodes": cnt.get("node_bytes", 0),
               "core_messages_inside_tiles": cnt.get("core_messages_local", 0),
               "core_messages_across_tiles": cnt.get("core_messages_remote", 0)}
        row["per_node"] = _node_stats(point["per_tile"])
        rows.append(row)
        if progress:
            progress(f"{workload} {c} tiles")
    base = rows[0]
    for r in rows:
        r["speedup"] = base["wall_s"] / r["wall_s"]
        r["efficiency"] = r["speedup"] / (r["tiles"] / base["tiles"]) if mode == "strong" else r["speedup"]
        r["invariant"] = r["matches_reference"] and (mode == "weak" or (r["digest"] == base["digest"] and r["cycles"] == base["cycles"]))
    return rows


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Speedup and efficiency against tile count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = [r["tiles"] for r in rows]
    ax.plot(x, [r["speedup"] for r in rows], marker="o", label="speedup")
    ax.plot(x, [r["efficiency"] for r in rows], marker="s", label="efficiency")
    ax.set_xlabel("tile actors")
    ax.set_title(f"{rows[0]['mode']} scaling, {rows[0]['workload']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
