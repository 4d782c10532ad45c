"""Where a decode token's host time goes, on one tile and on several: compiled loops, batches between tiles, Python.

Decodes the default model on its default mesh with in-process tiles and one numba thread (the tiles run one after
another, so their times add up to the CPU a token costs), times every call of the compiled collectives
(``program._stretch``), the GEMVs, the other compute kernels, and the batches that cross tile edges (packing,
posting: encode, deliver and decode, placing), and prints each per token with its calls, and the rest (the
protocol's and the collectives' Python, clock charges, the event loop). Each timed call pays ~1 us for its timer.

    python benchmarks/bench_split.py [--tokens 8] [--tiles 1x1,1x4,2x2]
"""

from __future__ import annotations

import os

os.environ["NUMBA_NUM_THREADS"] = "1"  # before numba starts its threads

import argparse  # noqa: E402
import collections  # noqa: E402
import functools  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import llm.decode_protocol as protocol  # noqa: E402
import wafer_actors.program as program  # noqa: E402
from llm.engine import WaferLlama  # noqa: E402
from llm.models import DEFAULT_MODEL, FromFile, load_model  # noqa: E402
from llm.placement import default_mesh  # noqa: E402
from wafer_actors.device import resolve  # noqa: E402
from wafer_actors.mesh import parse_grid  # noqa: E402
from wafer_actors.tile import Tile  # noqa: E402

UNTIMED = 3
seconds: collections.Counter = collections.Counter()
calls: collections.Counter = collections.Counter()
BUCKETS = {  # bucket -> (owner, attribute) of the calls it times
    "collectives (compiled)": [(program, "_stretch"), (program, "_run_phases")],
    "GEMVs": [(protocol, "block_vecmat")],
    "other kernels": [(protocol, k) for k in ("attention_scores", "attention_values", "exp_sum", "kv_put", "kv_take",
                                              "masked_max", "rms_scale", "rope", "sum_squares", "swiglu")],
    "batches: packing": [(program, "_batch_out")],
    "batches: posting (encode, deliver, decode)": [(Tile, "post_batch")],
    "batches: placing": [(program, "_batch_in")],
}


def timed(bucket: str, fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[bucket] += time.perf_counter() - t0
            calls[bucket] += 1
    return run


def split(tiling: str, tokens: int) -> tuple[float, dict[str, tuple[float, float]]]:
    """(ms a token, bucket -> (ms a token, calls a token)) of decode on ``tiling``."""
    cfg, weights, _ = load_model()
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, UNTIMED + tokens).tolist()
    mesh = default_mesh(cfg, resolve("wse2"), len(ids))
    with WaferLlama(cfg, FromFile(DEFAULT_MODEL, weights), mesh=mesh, tiles=parse_grid(tiling), transport="local",
                    tokens=len(ids)) as m:
        for t in ids[:UNTIMED]:
            m.step(t)
        seconds.clear()
        calls.clear()
        t0 = time.perf_counter()
        for t in ids[UNTIMED:]:
            m.step(t)
        total = (time.perf_counter() - t0) / tokens * 1e3
    return total, {b: (seconds[b] / tokens * 1e3, calls[b] / tokens) for b in BUCKETS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8, help="tokens timed per tiling (after three untimed ones)")
    ap.add_argument("--tiles", default="1x1,1x4,2x2")
    args = ap.parse_args()
    for bucket, owners in BUCKETS.items():
        for owner, name in owners:
            setattr(owner, name, timed(bucket, getattr(owner, name)))
    results = {t: split(t, args.tokens) for t in args.tiles.split(",")}
    print("decode of the default model, in-process tiles, one numba thread: ms a token (calls a token)")
    print(f"{'':44}" + "".join(f"{t:>20}" for t in results))
    print(f"{'total':44}" + "".join(f"{total:>20.0f}" for total, _ in results.values()))
    for bucket in BUCKETS:
        print(f"{bucket:44}" + "".join(f"{f'{b[bucket][0]:.1f} ({b[bucket][1]:,.0f})':>20}" for _, b in results.values()))
    print(f"{'rest (Python, charges, event loop)':44}" + "".join(
        f"{total - sum(ms for ms, _ in b.values()):>20.1f}" for total, b in results.values()))
    first = next(iter(results.values()))[0]
    print(f"{'total against ' + next(iter(results)):44}" + "".join(f"{total / first:>19.2f}x" for total, _ in results.values()))


if __name__ == "__main__":
    main()
