"""Paper-scale figures of the mesh protocols, and the emulator's own speed.

1. MeshGEMV vs the pipeline and ring allreduces at P = 360 on an 8K x 8K GEMV (float16,
   cost-only), and the relay stages on the critical path as P grows.
2. MeshGEMM vs Cannon and SUMMA at P = 720 on a 2K x 2K x 2K GEMM, with MeshGEMM's
   compute efficiency (ideal compute cycles / predicted cycles); per-step communication
   of MeshGEMM and Cannon as P grows.
3. Host wall time of a full-numerics MeshGEMV at P = 64 and 256 with 1, 4 and 16 Ray
   tiles, against one NumPy matmul of the same size in the same run.

    python benchmarks/bench_protocols.py [--quick] [--json OUT]

``--quick`` shrinks every size so the script finishes in about a minute.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from wafer_actors import preset
from wafer_actors.bench import bench_gemm, bench_gemv

WSE2 = preset("wse2")


def gemv_section(quick: bool) -> list[dict]:
    p, size = (64, 2048) if quick else (360, 8192)
    rows = [bench_gemv(p, size, size, algo=a, device=WSE2, cost_only=True) for a in ("ktree", "pipeline", "ring")]
    base = rows[0]["predicted_cycles"]
    print(f"\n[1] GEMV {size}x{size} float16 on {p}x{p} cores (cost-only)")
    print(f"{'algo':<10} {'cycles':>9} {'us':>8} {'relays':>7} {'routes':>7} {'x MeshGEMV':>11}")
    for r in rows:
        print(f"{r['algo']:<10} {r['predicted_cycles']:>9.0f} {r['predicted_us']:>8.3f} {r['relay_stages']:>7} {r['routes_per_core_max']:>7} {r['predicted_cycles'] / base:>11.2f}")
    print("relay stages on the critical path vs P:")
    print(f"{'P':>5} {'sqrt(P)':>8} {'ktree':>6} {'pipeline':>9} {'ring':>6}")
    for q in ((16, 36, 64) if quick else (64, 128, 256, 360, 720)):
        stages = {a: bench_gemv(q, 8 * q, 8 * q, algo=a, device=WSE2, cost_only=True)["relay_stages"] for a in ("ktree", "pipeline", "ring")}
        rows.append({"kind": "gemv_stages", "P": q, **stages})
        print(f"{q:>5} {np.sqrt(q):>8.1f} {stages['ktree']:>6} {stages['pipeline']:>9} {stages['ring']:>6}")
    return rows


def gemm_section(quick: bool) -> list[dict]:
    p, size = (32, 512) if quick else (720, 2048)
    print(f"\n[2] GEMM {size}x{size}x{size} float16 on {p}x{p} cores (cost-only)")
    rows = []
    for algo, relay in (("meshgemm", False), ("cannon", False), ("summa", False), ("summa", True)):
        t0 = time.perf_counter()
        try:
            r = bench_gemm(p, size, size, size, algo=algo, relay=relay, device=WSE2, cost_only=True)
            print(f"{algo + (' relay' if relay else ''):<12} {r['predicted_cycles']:>10.0f} cycles {r['predicted_us']:>9.2f} us  "
                  f"efficiency {r['compute_efficiency']:6.1%}  routes {r['routes_per_core_max']:>3}  ({time.perf_counter() - t0:.0f} s host)")
        except Exception as err:  # SUMMA without relays is expected to run out of routes
            r = {"kind": "gemm", "algo": algo, "P": p, "relay": relay, "error": f"{type(err).__name__}: {str(err).split(': routes')[0]}"}
            print(f"{algo:<12} {r['error']}")
        rows.append(r)
    print("per-step communication (1x1 blocks, compute made free):")
    fast = WSE2.replace(name="wse2-free-compute", fmacs_per_cycle={"float16": 1e9, "float32": 1e9})
    for q in ((4, 8, 16, 32) if quick else (16, 64, 128, 256)):
        per = {a: bench_gemm(q, q, q, q, algo=a, device=fast, cost_only=True)["predicted_cycles"] / q for a in ("meshgemm", "cannon")}
        rows.append({"kind": "gemm_step", "P": q, **per})
        print(f"  P={q:>4}: MeshGEMM {per['meshgemm']:7.1f} cycles/step, Cannon {per['cannon']:7.1f} cycles/step")
    return rows


def emulator_section(quick: bool) -> list[dict]:
    import ray

    from wafer_actors.fabric.ray import start_local_ray

    start_local_ray()
    print("\n[3] emulator wall time, MeshGEMV full numerics (float32, Ray tiles) vs one NumPy matmul")
    rows = []
    for p, size in (((16, 512), (32, 1024)) if quick else ((64, 2048), (256, 4096))):
        x = np.random.default_rng(0).standard_normal(size).astype(np.float32)
        w = np.random.default_rng(1).standard_normal((size, size)).astype(np.float32)
        t0 = time.perf_counter()
        for _ in range(10):
            x @ w
        numpy_s = (time.perf_counter() - t0) / 10
        for tiles in ((1, 1), (2, 2), (4, 4)):
            r = bench_gemv(p, size, size, algo="ktree", device=WSE2, tiles=tiles, transport="ray", dtype="float32", repeats=3)
            r.update(numpy_s=numpy_s, tiles=f"{tiles[0]}x{tiles[1]}")
            rows.append(r)
            print(f"  P={p:>3} {size}x{size} tiles {tiles[0]}x{tiles[1]}: warm run {r['run_wall_s'] * 1e3:7.1f} ms = "
                  f"{r['run_wall_s'] / numpy_s:6.0f}x NumPy's {numpy_s * 1e3:.2f} ms (start-up, load and 3 runs {r['host_wall_s']:5.1f} s), "
                  f"max |err| {r['max_abs_error']:.1e}, {r['tile_messages']} tile messages")
    ray.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: gemv,gemm,emulator")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    rows = []
    if "gemv" not in skip:
        rows += gemv_section(args.quick)
    if "gemm" not in skip:
        rows += gemm_section(args.quick)
    if "emulator" not in skip:
        rows += emulator_section(args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
