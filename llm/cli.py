"""The ``wafer-llm`` command line."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from wafer_actors import Spec, Wafer
from wafer_actors.collectives import chain_allreduce, shift
from wafer_actors.device import _PRESETS, resolve
from wafer_actors.mesh import parse_grid


def cmd_devices(args: argparse.Namespace) -> int:
    """Print the device presets."""
    for d in _PRESETS.values():
        print(
            f"{d.name}: {d.height}x{d.width} cores, {d.sram_bytes // 1024} KB SRAM/core, {d.clock_hz / 1e9:.1f} GHz, "
            f"link {d.link_bytes_per_cycle:g} B/cycle, alpha {d.alpha:g}, beta {d.beta:g} cycles, "
            f"{d.routes_per_core} routes/core"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Shift and allreduce a random tensor on an emulated wafer and check them against NumPy."""
    mesh, tiles, device = parse_grid(args.mesh), parse_grid(args.tiles), resolve(args.device)
    a = np.random.default_rng(args.seed).standard_normal(mesh + (args.block,)).astype(np.float32)
    t0 = time.perf_counter()
    with Wafer(mesh, device=device, tiles=tiles, transport=args.transport) as w:
        print(f"{mesh[0]}x{mesh[1]} cores of {device.name} in {tiles[0]}x{tiles[1]} tiles ({args.transport}), "
              f"started in {time.perf_counter() - t0:.1f} s")
        checks = (
            ("shift x+1 (wrap)", shift, dict(axis="x", disp=1, wrap=True), np.roll(a, 1, axis=1)),
            ("allreduce add along y", chain_allreduce, dict(axis="y", op="add"), np.broadcast_to(a.sum(0, keepdims=True), a.shape)),
            ("allreduce max along x", chain_allreduce, dict(axis="x", op="max"), np.broadcast_to(a.max(1, keepdims=True), a.shape)),
        )
        for name, proto, kwargs, expected in checks:
            w.load("v", a, Spec("y", "x", None))
            w.reset_clocks()
            s = w.run(proto, buffer="v", **kwargs)
            err = float(np.abs(w.read("v") - expected).max())
            print(f"  {name:<22} {s.cycles:>8.0f} cycles = {s.seconds * 1e6:8.3f} us on device | "
                  f"host {s.host_wall_s * 1e3:7.1f} ms, {s.counts['tile_messages']} tile messages | max |err| vs NumPy {err:.1e}")
            if err > 1e-4:
                print(f"error: {name} differs from NumPy by {err}", file=sys.stderr)
                return 1
        print(f"  SRAM high-water {int(w.memory()[1].max())} B of {device.sram_bytes} B per core")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="wafer-llm", description="Wafer-scale LLM inference on an emulated wafer.")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("devices", help="list device presets").set_defaults(fn=cmd_devices)
    demo = sub.add_parser("demo", help="run the fabric protocols on an emulated wafer and check them against NumPy")
    demo.add_argument("--mesh", default="32x32", help="cores, ROWSxCOLS (default 32x32)")
    demo.add_argument("--tiles", default="2x2", help="tile actors, ROWSxCOLS (default 2x2)")
    demo.add_argument("--transport", default="ray", choices=["ray", "local"])
    demo.add_argument("--device", default="wse2", help="preset name or a .toml/.json device file")
    demo.add_argument("--block", type=int, default=64, help="float32 elements per core")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(fn=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, MemoryError, RuntimeError) as err:
        print(f"wafer-llm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
