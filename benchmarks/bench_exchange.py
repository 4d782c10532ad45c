"""What a tile pays the host per collective, besides its loops over cores: the emulator's fixed cost.

Runs 2,000 K-tree allreduces of a 4-element vector per core (along y and x in turn, as decode
does) on an 8x8 mesh, so the loops over cores cost next to nothing, with the mesh on one tile,
on two (the x allreduces cross a tile edge) and on four (every one does), in-process and as Ray
tiles. Prints the host microseconds per allreduce, each ratio to the first tiling in-process (one
tile by default) in the same run, and per tile the part spent running (busy) and waiting for
another tile's message.

    python benchmarks/bench_exchange.py [--count 2000] [--skip-ray]

The options set the mesh, the elements a core, the axes and the tilings: decode's allreduces along
x on its default mesh, with tiles that hold whole columns, as ``bench_decode.py`` places them:

    python benchmarks/bench_exchange.py --mesh 120x120 --block 5 --axes x --tiles 1x1,1x4 --count 200
"""

from __future__ import annotations

import argparse

from wafer_actors import InvalidArgument
from wafer_actors.bench import bench_exchange
from wafer_actors.mesh import Mesh, Tiling, parse_grid


def grid(text: str) -> tuple[int, int]:
    """A ROWSxCOLS grid, or argparse's error saying what is valid."""
    try:
        return parse_grid(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def grids(text: str) -> list[tuple[int, int]]:
    """Comma-separated ROWSxCOLS grids."""
    return [grid(t) for t in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=2000, help="allreduces timed per configuration")
    ap.add_argument("--mesh", type=grid, default=(8, 8), help="ROWSxCOLS cores (default 8x8)")
    ap.add_argument("--block", type=int, default=4, help="float32 elements a core (default 4)")
    ap.add_argument("--axes", default="yx", choices=("yx", "xy", "x", "y"), help="the axes allreduced along in turn")
    ap.add_argument("--tiles", type=grids, default=[(1, 1), (1, 2), (2, 2)],
                    help="tilings, comma-separated (default 1x1,1x2,2x2); the first is the ratios' base")
    ap.add_argument("--skip-ray", action="store_true")
    args = ap.parse_args()
    mesh = args.mesh
    try:  # every tiling before any runs
        for tiles in args.tiles:
            Tiling(Mesh(*mesh), tiles)
    except InvalidArgument as e:
        ap.error(f"argument --tiles: {e}")
    configs = [("local", tiles) for tiles in args.tiles]
    if not args.skip_ray:
        from wafer_actors.fabric.ray import start_local_ray

        start_local_ray()
        configs += [("ray", tiles) for tiles in args.tiles]
    print(f"mesh {mesh[0]}x{mesh[1]}, {args.block} elements a core, along {args.axes} in turn")
    print(f"{'tiles':>5} {'transport':>9} {'us/allreduce':>12} {'x 1st':>6}  per tile: busy / waiting us")
    base = None
    for transport, tiles in configs:
        r = bench_exchange(mesh, tiles, transport=transport, count=args.count, block=args.block, axes=args.axes)
        base = base or r["us_per_allreduce"]
        per = "  ".join(f"{b:.0f} / {w:.0f}" for b, w in zip(r["busy_us"], r["wait_us"]))
        print(f"{tiles[0]}x{tiles[1]:<3} {transport:>9} {r['us_per_allreduce']:>12.1f} {r['us_per_allreduce'] / base:>6.1f}  {per}",
              flush=True)


if __name__ == "__main__":
    main()
