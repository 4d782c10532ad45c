"""Prefill of a prompt on the default model's default mesh: emulation wall time vs the NumPy reference.

Prints, in one run: the NumPy reference's time for the same prompt (one position at a
time, all logits), the emulation's prefill wall time and its ratio, the largest logit
difference, the predicted device time of each prefill phase (time to first token, the
KV hand-over) and the SRAM high-water mark per core.

    python benchmarks/bench_prefill.py [--tokens 128] [--mesh 144x144] [--tiles 1x1] [--executor fused|step]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from llm.engine import WaferLlama
from llm.models import load_model
from llm.placement import default_mesh
from llm.reference import ReferenceModel
from wafer_actors.device import resolve
from wafer_actors.mesh import parse_grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--mesh", default=None)
    ap.add_argument("--tiles", default="1x1")
    ap.add_argument("--transport", default="local", choices=["local", "ray"])
    ap.add_argument("--executor", default="fused", choices=["fused", "step"])
    args = ap.parse_args()
    cfg, weights, _ = load_model(args.model)
    device = resolve("wse2")
    ids = [int(t) for t in np.random.default_rng(0).integers(0, cfg.vocab_size, args.tokens)]
    mesh = parse_grid(args.mesh) if args.mesh else default_mesh(cfg, device, args.tokens + 1, prefill_tokens=args.tokens)

    t0 = time.perf_counter()
    ref = ReferenceModel(cfg, weights, args.tokens)
    want = np.stack([ref.forward(t, i) for i, t in enumerate(ids)])
    ref_s = time.perf_counter() - t0

    with WaferLlama(cfg, weights, mesh=mesh, device=device, tiles=parse_grid(args.tiles), transport=args.transport,
                    tokens=args.tokens + 1, prefill_tokens=args.tokens, executor=args.executor) as m:
        t0 = time.perf_counter()
        logits, st = m.prefill(ids)
        emu_s = time.perf_counter() - t0
        regions = len(m.placement.regions)
    err = float(np.abs(logits - want).max() / np.abs(want).max())
    hz = device.clock_hz
    print(f"model {cfg.name}, {args.tokens}-token prompt, mesh {mesh[0]}x{mesh[1]} x {regions} region(s), "
          f"tiles {args.tiles} ({args.transport}) on {device.name}, {args.executor} executor")
    print(f"numpy reference: {ref_s:.2f} s | emulated prefill: {emu_s:.1f} s ({emu_s / ref_s:.0f}x the reference) | "
          f"max logit error {err:.1e} (relative to the largest logit)")
    print(f"predicted: weights skewed {st.relayout_cycles:,.0f} cycles, layers {sum(st.region_cycles):,.0f}, "
          f"region crossings {st.crossing_cycles:,.0f} -> time to first token {1e3 * st.ttft_cycles / hz:.3f} ms "
          f"({args.tokens * hz / st.ttft_cycles:,.0f} prompt tokens/s); KV hand-over + weights back "
          f"{st.handover_cycles:,.0f} cycles ({1e3 * st.handover_cycles / hz:.3f} ms)")
    print(f"SRAM high-water {st.sram_high_water_bytes} of {device.sram_bytes} B per core")


if __name__ == "__main__":
    main()
