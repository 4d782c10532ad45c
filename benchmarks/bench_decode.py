"""Decode of the default model on its default mesh: emulation speed and memory vs the NumPy reference.

Prints, in one run: NumPy reference ms/token; emulation ms/token (the mean, and the median token,
steadier on a shared machine) with 1 tile, 2 tiles (1x2: as many Ray tiles as a 2-core machine has cores) and 4
tiles (2x2, and 1x4, whose tiles each hold whole columns, so decode's allreduces along y stay inside them; local
in-process tiles and Ray actors);
their ratios to the reference; the CPU time all processes spend per token (with four Ray tiles on a
2-core machine, how busy the cores were); the predicted device speed; the peak memory of all processes
(driver and Ray workers; resident and proportional sets) while the engine starts and while it
decodes (two tokens after the timed ones: reading the processes' memory maps slows them, so the
timed tokens run unsampled, as the reference's do), against the model's bytes; and the KV
capacity of shift vs concat for LLaMA3-8B on a 360x360 region (float16, the paper's setting;
shapes only).

Each configuration runs in a fresh process (in one process, the heap the earlier ones left behind
counted against the later ones), started as ``wafer-llm generate`` starts: the model read from its
file and handed to the engine as a loader (``FromFile``), so the host keeps only the token rows it
looks up while the tiles hold the weights. With ``--converted DIR`` (a ``wafer-llm convert`` of the
default model) the tiles read their weights from its shards (its mesh and tiles) instead.

    python benchmarks/bench_decode.py [--tokens 8] [--mesh 120x120] [--skip-ray] [--executor fused|step] [--converted DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

import numpy as np
import psutil

from llm.config import preset
from llm.engine import WaferLlama
from llm.models import DEFAULT_MODEL, FromFile, load_model
from llm.placement import default_mesh, place
from llm.reference import ReferenceModel
from wafer_actors.device import resolve
from wafer_actors.mesh import parse_grid

WARM_UP = 2  # untimed tokens first: plans, caches and compiles (the second token is the first to shift the KV cache)
MEMORY_TOKENS = 2  # tokens after the timed ones, decoded while the memory is sampled


class PeakMemory:
    """Samples the memory of this process and all its descendants: the sum of their resident sets every 50 ms
    (pages shared by several processes, such as libraries and Ray's object store, counted once in each) and
    the sum of their proportional sets every 0.5 s (each shared page split among its processes: the physical
    memory the run holds)."""

    def __init__(self) -> None:
        self.peak = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _sample(pss: bool) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss if pss else p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        tick = 0
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._sample(False))
            tick += 1
            if tick % 10 == 0:
                self.peak_pss = max(self.peak_pss, self._sample(True))

    def __enter__(self) -> PeakMemory:
        self.peak, self.peak_pss = self._sample(False), self._sample(True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds() -> float:
    """CPU time (user and system) this process and all its descendants (Ray's workers included) have used."""
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def run_one(spec: str, args: argparse.Namespace) -> dict:
    """Time and measure one configuration (``TRANSPORT:ROWSxCOLS``, or ``TRANSPORT:converted``) in this process."""
    transport, tiling = spec.split(":")
    device = resolve("wse2")
    cfg, weights, _ = load_model()
    # the weights as generate passes them (the loader hands them to the engine, which keeps none); read again on a
    # recovery. A converted checkpoint's tiles read their shards instead.
    loader = None if args.converted else FromFile(DEFAULT_MODEL, weights)
    del weights
    mesh = parse_grid(args.mesh) if args.mesh else default_mesh(cfg, device, args.tokens + WARM_UP + MEMORY_TOKENS)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, args.tokens + WARM_UP + MEMORY_TOKENS).tolist()
    if transport == "ray":
        from wafer_actors.fabric.ray import start_local_ray

        start_local_ray(num_cpus=2)
    with PeakMemory() as start:
        if args.converted:
            engine = WaferLlama.from_converted(args.converted, transport=transport, tokens=len(tokens),
                                               executor=args.executor)
        else:
            engine = WaferLlama(cfg, loader, mesh=mesh, tiles=parse_grid(tiling), transport=transport,
                                tokens=len(tokens), executor=args.executor)
    with engine as m:
        for t in tokens[:WARM_UP]:
            m.step(t)
        times = []  # unsampled: a sample reads every process's memory maps, which stalls it (1x1 in-process,
        cpu = cpu_seconds()  # blocks of four tokens interleaved: median 128 ms a token unsampled, 140 sampled)
        for t in tokens[WARM_UP:-MEMORY_TOKENS]:
            t0 = time.perf_counter()
            _, st = m.step(t)
            times.append(time.perf_counter() - t0)
        cpu = cpu_seconds() - cpu
        with PeakMemory() as mem:
            for t in tokens[-MEMORY_TOKENS:]:
                m.step(t)
    return {"tiles": list(m.tiles), "ms": float(np.mean(times)) * 1e3, "median_ms": float(np.median(times)) * 1e3,
            "cpu_ms": cpu / len(times) * 1e3, "cycles": st.cycles, "start_pss": start.peak_pss, "rss": mem.peak,
            "pss": mem.peak_pss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8, help="tokens timed per configuration (after two untimed ones)")
    ap.add_argument("--mesh", default=None, help="region ROWSxCOLS (default: the model's default mesh)")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--executor", default="fused", choices=["fused", "step"])
    ap.add_argument("--converted", default=None, help="a converted checkpoint of the default model to start the tiles from")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # TRANSPORT:TILES, run by main in a fresh process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    device = resolve("wse2")
    cfg, w, _ = load_model()
    model_bytes = sum(a.nbytes for a in vars(w).values() if isinstance(a, np.ndarray) and a.base is None)
    mesh = parse_grid(args.mesh) if args.mesh else default_mesh(cfg, device, args.tokens + WARM_UP + MEMORY_TOKENS)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, args.tokens + WARM_UP + MEMORY_TOKENS).tolist()

    ref = ReferenceModel(cfg, w, len(tokens))
    for i, t in enumerate(tokens[:WARM_UP]):
        ref.forward(t, i)
    ref_times = []
    for i, t in enumerate(tokens[WARM_UP:-MEMORY_TOKENS], start=WARM_UP):
        t0 = time.perf_counter()
        ref.forward(t, i)
        ref_times.append(time.perf_counter() - t0)
    ref_ms, ref_median = float(np.mean(ref_times)) * 1e3, float(np.median(ref_times)) * 1e3
    del ref, w  # each run reads the model as `wafer-llm generate` does, and holds what it holds
    print(f"model {cfg.name}: {model_bytes / 2**20:.0f} MiB of float32 weights; mesh {mesh[0]}x{mesh[1]} on {device.name}; "
          f"{args.executor} executor")
    print(f"numpy reference: {ref_ms:.1f} ms/token (median token {ref_median:.1f} ms)")
    tilings = ["1x1", "1x2", "2x2", "1x4"]  # 1x4: decode's allreduces along y (7 of 10 a layer) stay inside a tile
    if args.converted:
        tilings = ["converted"]
        print(f"tiles start from the converted checkpoint {args.converted}")
    print("ms/token: the mean over the timed tokens; median: the median token and its ratio to the reference's "
          "(steadier where the machine is shared)")
    print("memory: the peak of all processes (resident set, RSS, and proportional set, PSS) while the engine starts "
          f"and loads the weights, and while it decodes {MEMORY_TOKENS} tokens after the timed ones")
    print("CPU ms/token: the CPU time of all processes (driver and tiles) per timed token; cores: CPU over wall time "
          "(how many cores were busy on average; a tile's second thread waits for the next parallel loop spinning, so "
          "a two-thread tile counts two)")
    print(f"{'tiles':>5} {'transport':>9} {'ms/token':>9} {'x ref':>6} {'median':>7} {'x ref':>6} {'CPU ms/token':>13} "
          f"{'cores':>6} {'cycles/token':>13} "
          f"{'tok/s (device)':>15} {'start PSS MiB':>14} {'decode RSS MiB':>15} {'x model':>8} {'decode PSS MiB':>15} "
          f"{'x model':>8}")
    ray_ms = {}  # tiles -> (mean, median) ms/token with Ray tiles
    for transport in ["local"] if args.skip_ray else ["local", "ray"]:
        for tiling in tilings:
            cmd = [sys.executable, __file__, "--one", f"{transport}:{tiling}", "--tokens", str(args.tokens),
                   "--executor", args.executor] + (["--mesh", args.mesh] if args.mesh else []) + (
                   ["--converted", args.converted] if args.converted else [])
            r = json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.splitlines()[-1])
            tiles, ms, cycles = tuple(r["tiles"]), r["ms"], r["cycles"]
            if transport == "ray":
                ray_ms[tiles] = ms, r["median_ms"]
            print(f"{f'{tiles[0]}x{tiles[1]}':>5} {transport:>9} {ms:>9.0f} {ms / ref_ms:>6.1f} {r['median_ms']:>7.0f} "
                  f"{r['median_ms'] / ref_median:>6.1f} {r['cpu_ms']:>13.0f} {r['cpu_ms'] / ms:>6.1f} {cycles:>13,.0f} "
                  f"{device.clock_hz / cycles:>15,.0f} {r['start_pss'] / 2**20:>14,.0f} {r['rss'] / 2**20:>15,.0f} "
                  f"{r['rss'] / model_bytes:>8.1f} {r['pss'] / 2**20:>15,.0f} {r['pss'] / model_bytes:>8.1f}", flush=True)
    bound = 1.5 * model_bytes + 2**30
    print(f"memory bound (1.5x the model's float32 bytes + 1 GiB): {bound / 2**20:,.0f} MiB, {bound / model_bytes:.1f}x the model")
    if (1, 1) in ray_ms:
        print("Ray tiles against 1 Ray tile, mean (median token): " + ", ".join(
            f"{t[0]}x{t[1]} {ms[0] / ray_ms[1, 1][0]:.1f}x ({ms[1] / ray_ms[1, 1][1]:.1f}x)"
            for t, ms in ray_ms.items() if t != (1, 1)))

    llama = preset("llama3-8b")
    print("KV capacity, LLaMA3-8B (float16) on the four 360x360-core regions of wse2, context limit lifted:")
    unlimited = llama.__class__(**{**vars(llama), "max_seq_len": 10**9})
    caps = {kv: place(unlimited, device, 360, 360, kv_mode=kv, regions=4, elem_bytes=2).capacity() for kv in ("concat", "shift")}
    print(f"  concat {caps['concat']:,} tokens, shift {caps['shift']:,} tokens: {caps['shift'] / caps['concat']:.0f}x")


if __name__ == "__main__":
    main()
