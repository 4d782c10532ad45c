"""What a tile pays the host per collective, besides its loops over cores: the emulator's fixed cost.

Runs 2,000 K-tree allreduces of a 4-element vector per core (along y and x in turn, as decode
does) on an 8x8 mesh, so the loops over cores cost next to nothing, with the mesh on one tile,
on two (the x allreduces cross a tile edge) and on four (every one does), in-process and as Ray
tiles. Prints the host microseconds per allreduce, each ratio to one in-process tile in the same
run, and per tile the part spent running (busy) and waiting for another tile's message.

    python benchmarks/bench_exchange.py [--count 2000] [--skip-ray]
"""

from __future__ import annotations

import argparse

from wafer_actors.bench import bench_exchange


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=2000, help="allreduces timed per configuration")
    ap.add_argument("--skip-ray", action="store_true")
    args = ap.parse_args()
    configs = [("local", (1, 1)), ("local", (1, 2)), ("local", (2, 2))]
    if not args.skip_ray:
        from wafer_actors.fabric.ray import start_local_ray

        start_local_ray()
        configs += [("ray", (1, 1)), ("ray", (1, 2)), ("ray", (2, 2))]
    print(f"{'tiles':>5} {'transport':>9} {'us/allreduce':>12} {'x 1 tile':>8}  per tile: busy / waiting us")
    base = None
    for transport, tiles in configs:
        r = bench_exchange((8, 8), tiles, transport=transport, count=args.count)
        base = base or r["us_per_allreduce"]
        per = "  ".join(f"{b:.0f} / {w:.0f}" for b, w in zip(r["busy_us"], r["wait_us"]))
        print(f"{tiles[0]}x{tiles[1]:<3} {transport:>9} {r['us_per_allreduce']:>12.1f} {r['us_per_allreduce'] / base:>8.1f}  {per}",
              flush=True)


if __name__ == "__main__":
    main()
