"""Benchmark the emulator's fabric: a shift and a chain allreduce on a 64x64-core mesh.

For each tiling it prints the host wall time per operation, the actor messages sent
between tiles, the predicted device cycles, and the ratio of wall time against the same
arithmetic done by one NumPy call in the same process.

    python benchmarks/bench_fabric.py [--mesh 64x64] [--tiles 1x1,2x2,4x4] [--transport ray] [--block 64]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from wafer_actors import Spec, Wafer
from wafer_actors.collectives import chain_allreduce, shift
from wafer_actors.mesh import parse_grid


def numpy_time(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mesh", default="64x64")
    ap.add_argument("--tiles", default="1x1,2x2,4x4")
    ap.add_argument("--transport", default="ray", choices=["ray", "local"])
    ap.add_argument("--block", type=int, default=64, help="float32 elements per core")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    mesh = parse_grid(args.mesh)
    a = np.random.default_rng(0).standard_normal(mesh + (args.block,)).astype(np.float32)
    ref_shift = np.roll(a, 1, axis=1)
    ref_sum = np.broadcast_to(a.sum(axis=1, keepdims=True), a.shape)
    np_shift = numpy_time(lambda: np.roll(a, 1, axis=1), 50)
    np_sum = numpy_time(lambda: np.broadcast_to(a.sum(axis=1, keepdims=True), a.shape).copy(), 50)
    print(f"mesh {mesh[0]}x{mesh[1]} cores, {args.block} float32 per core, transport {args.transport}")
    print(f"numpy: shift {np_shift * 1e3:.3f} ms, allreduce {np_sum * 1e3:.3f} ms")
    header = f"{'op':<10} {'tiles':>5} {'wall ms/op':>11} {'x numpy':>9} {'tile msgs/op':>13} {'core msgs/op':>13} {'cycles':>8}"
    print(header)
    print("-" * len(header))
    for grid in args.tiles.split(","):
        tiles = parse_grid(grid)
        with Wafer(mesh, tiles=tiles, transport=args.transport) as w:
            for name, proto, kwargs, np_t in (
                ("shift", shift, dict(axis="x", disp=1, wrap=True), np_shift),
                ("allreduce", chain_allreduce, dict(axis="x", op="add"), np_sum),
            ):
                w.load("v", a, Spec("y", "x", None))
                w.run(proto, buffer="v", **kwargs)  # warm-up: imports, plan caches
                w.load("v", a, Spec("y", "x", None))
                w.reset_clocks()  # time each operation alone, from a common start
                runs = [w.run(proto, buffer="v", **kwargs)]
                expected = ref_shift if name == "shift" else ref_sum
                np.testing.assert_allclose(w.read("v"), expected, rtol=1e-5, atol=1e-5)
                for _ in range(args.reps - 1):
                    w.reset_clocks()
                    runs.append(w.run(proto, buffer="v", **kwargs))
                wall = np.median([r.host_wall_s for r in runs])
                s = runs[0]
                core_msgs = s.counts["core_messages_local"] + s.counts["core_messages_remote"]
                print(
                    f"{name:<10} {tiles[0] * tiles[1]:>5} {wall * 1e3:>11.2f} {wall / np_t:>9.0f} "
                    f"{s.counts['tile_messages']:>13} {core_msgs:>13} {s.cycles:>8.0f}"
                )
                assert all(r.cycles == s.cycles for r in runs), "predicted cycles changed between repeats"


if __name__ == "__main__":
    main()
