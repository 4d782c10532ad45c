"""The ``wafer-llm`` command line."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from wafer_actors import Spec, Wafer
from wafer_actors.collectives import chain_allreduce, shift
from wafer_actors.device import _PRESETS, CALIBRATION, resolve
from wafer_actors.errors import InputError, InvalidArgument, TileLost
from wafer_actors.mesh import parse_grid

from .config import PRESETS
from .paper_kernel import check_kernel
from .heatmap import draw, heatmap_data, heatmap_json
from .trace import DETAILS, rows_trace, trace_events, write_trace
from .utilisation import generation_utilisation, op_utilisation


def cmd_devices(args: argparse.Namespace) -> int:
    """Print the device presets."""
    for d in _PRESETS.values():
        print(
            f"{d.name}: {d.height}x{d.width} cores, {d.sram_bytes // 1024} KB SRAM/core, {d.clock_hz / 1e9:g} GHz, "
            f"link {d.link_bytes_per_cycle:g} B/cycle, alpha {d.alpha:g}, beta {d.beta:g} cycles, "
            f"{d.routes_per_core} routes/core, {d.power_watts / 1e3:g} kW\n"
            f"  {CALIBRATION.get(d.name, 'not calibrated: no figure of this device is in the calibration set')}"
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


GEMV_ALGOS = {"meshgemv": "ktree", "ktree": "ktree", "pipeline": "pipeline", "ring": "ring", "chain": "chain"}
GEMM_ALGOS = ("meshgemm", "cannon", "summa", "gemm_t")
COLUMNS = (
    ("algo", "{:<10}"), ("P", "{:>5}"), ("predicted_cycles", "{:>12.0f}"), ("predicted_us", "{:>10.3f}"),
    ("compute_cycles", "{:>12.0f}"), ("comm_cycles", "{:>11.0f}"), ("relay_stages", "{:>7}"),
    ("routes_per_core_max", "{:>7}"), ("sram_peak_bytes_max", "{:>9}"), ("host_wall_s", "{:>8.2f}"),
)
HEADERS = ("algo", "P", "cycles", "us", "compute", "comm", "relays", "routes", "SRAM B", "wall s")


def _print_row(row: dict) -> None:
    if "error" in row:
        print(f"{row['algo']:<10} {row['P']:>5}  {row['error'].split(': routes')[0]}")
        return
    cells = [fmt.format(row[key]) for key, fmt in COLUMNS]
    if "compute_efficiency" in row:
        cells.append(f"{row['compute_efficiency']:>6.1%}")
    print(" ".join(cells))


def cmd_bench(args: argparse.Namespace) -> int:
    """Run GEMV or GEMM protocols at one P or a sweep of P; print a table, write JSON and a plot."""
    from tqdm import tqdm

    from wafer_actors.bench import bench_gemm, bench_gemv, plot_sweep
    from wafer_actors.errors import CoreMemoryError, RoutingError

    device = resolve(args.device)
    tiles = parse_grid(args.tiles)
    sizes = _int_list(args.sweep_P, "--sweep-P") if args.sweep_P else [args.P]
    algos = [a.strip() for a in args.algo.split(",")]
    valid = GEMV_ALGOS if args.op == "gemv" else GEMM_ALGOS
    for a in algos:
        if a not in valid:
            raise InvalidArgument(f"unknown {args.op} algo {a!r}; choose from {', '.join(valid)}")
    header = " ".join(f"{h:>{len(fmt.format(0))}}" for h, (_, fmt) in zip(HEADERS, COLUMNS))
    print(f"{args.op}: device {device.name}, dtype {args.dtype}, {'cost-only' if args.cost_only else 'full numerics'}, tiles {args.tiles}")
    print(header + ("  effic." if args.op == "gemm" else ""))
    rows = []
    jobs = [(p, a) for p in sizes for a in algos]
    bar = tqdm(jobs, desc=args.op, unit="run", disable=len(jobs) == 1, leave=False)
    for p, algo in bar:
        bar.set_postfix_str(f"{algo} P={p}")
        common = dict(device=device, tiles=tiles, transport=args.transport, dtype=args.dtype, cost_only=args.cost_only,
                      executor=args.executor, trace=args.trace is not None)
        try:
            if args.op == "gemv":
                row = bench_gemv(p, args.M, args.N, algo=GEMV_ALGOS[algo], group_num=args.group_num, **common)
                row["algo"] = algo
            else:
                row = bench_gemm(p, args.M, args.K, args.N, algo=algo, relay=args.relay, **common)
        except (RoutingError, CoreMemoryError, ValueError) as err:
            if len(jobs) == 1:
                raise
            row = {"kind": args.op, "algo": algo, "P": p, "error": f"{type(err).__name__}: {err}"}
        rows.append(row)
        bar.clear()
        _print_row(row)
    if args.trace:
        write_trace(args.trace, rows_trace(rows, device.clock_hz, device.name, args.trace_detail))
    if args.json:
        Path(args.json).write_text(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2))
    if args.plot:
        plot_sweep(rows, args.plot, f"{args.op} {args.M}x{args.N} on {device.name}")
    return 0


def _percent(util: dict, key: str) -> str:
    return f"{100 * util[key]:.2g}%" if key in util else "-"


def cmd_generate(args: argparse.Namespace) -> int:
    """Decode a prompt on an emulated wafer, streaming tokens; report predicted device speed."""
    from tqdm import tqdm

    from .engine import WaferLlama
    from .generate import generate
    from .models import FromFile, load_model
    from .converted import Converted
    from .placement import default_mesh
    from .sampling import Sampler
    from .warm import warm_up

    if args.max_new_tokens < 1:
        raise InvalidArgument(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.cost_only:
        return _generate_cost_only(args)
    for flag, value in (("--prompt-tokens", args.prompt_tokens), ("--one-layer", args.one_layer or None)):
        if value is not None:
            raise InvalidArgument(f"{flag} is for --cost-only runs (a model's shapes, no weights)")
    if args.prompt is None and args.chat is None:
        raise InvalidArgument("give the prompt: --prompt TEXT or --chat MESSAGE (or --cost-only --prompt-tokens N)")
    args.transport = args.transport or "ray"
    sampler = Sampler(args.temperature, args.top_k, args.top_p, args.seed)  # bad values fail before loading
    tiles = parse_grid(args.tiles) if args.tiles else None
    device = resolve(args.device) if args.device else None
    if args.mesh:
        (device or resolve("wse2")).check_mesh(*parse_grid(args.mesh))
    if args.regions is not None and args.regions < 1:
        raise InvalidArgument(f"--regions must be at least 1, got {args.regions}")
    drain = _drain(args.drain_node, args.transport)
    if args.snapshot_every < 0:
        raise InvalidArgument(f"--snapshot-every must be a number of steps >= 0 (0: no snapshots), got {args.snapshot_every}")
    if args.transport == "ray" and args.address is None:  # tiles on this machine: they meet the loops ready
        warm_up(args.kv, args.algo, args.executor, args.prefill)
    t0 = time.perf_counter()
    cfg, weights, tok = load_model(args.model)
    conv = weights if isinstance(weights, Converted) else None  # its placement gives the defaults
    if conv is None:  # read again on a recovery: the host keeps no copy while the tiles run
        weights = FromFile(args.model, weights)
    tiles = tiles or (conv.tiles if conv else (1, 1))
    device = device or (conv.device if conv else resolve("wse2"))
    regions = args.regions or (len(conv.index["regions"]) if conv else 1)
    if tok is None:
        raise InvalidArgument(f"{args.model} has no tokenizer.json: text prompts need one")
    text = tok.chat(args.chat) if args.chat is not None else args.prompt
    prompt_ids = tok.encode(text) if args.chat is not None else tok.encode_prompt(text)
    if not prompt_ids:
        raise InvalidArgument("the prompt is empty")
    tokens = len(prompt_ids) + args.max_new_tokens - 1
    if tokens > cfg.max_seq_len:  # before placement, whose failure would blame the mesh
        raise InvalidArgument(
            f"the prompt's {len(prompt_ids)} tokens and --max-new-tokens {args.max_new_tokens} make {tokens} positions; "
            f"{cfg.name}'s context is {cfg.max_seq_len}: ask for at most {cfg.max_seq_len - len(prompt_ids) + 1} new tokens")
    room = len(prompt_ids) if args.prefill == "mesh" else 0
    if args.mesh:
        mesh = parse_grid(args.mesh)
    else:
        mesh = conv.mesh if conv else default_mesh(cfg, device, tokens, prefill_tokens=room)
    print(f"{cfg.name}: {cfg.n_layers} layers, dim {cfg.dim}, loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if args.transport == "ray":
        _start_ray()
    if drain:  # before placement: a node that is not there is refused before any work
        drain = (_alive_node(drain[0]), drain[1])
    loading = tqdm(desc="weights", unit="B", unit_scale=True, leave=False, file=sys.stderr, delay=1)
    with WaferLlama(cfg, weights, mesh=mesh, device=device, tiles=tiles, transport=args.transport, kv=args.kv,
                    tokens=tokens, regions=regions, algo=args.algo, prefill_tokens=room, executor=args.executor,
                    on_failure=args.on_failure, snapshot_every=args.snapshot_every, on_load=_progress(loading),
                    trace=args.trace is not None, activity=args.heatmap is not None) as engine:
        loading.close()
        p = engine.placement
        print(f"placed on {len(p.regions)} region(s) of {mesh[0]}x{mesh[1]} cores of {device.name}, {tiles[0]}x{tiles[1]} "
              f"tiles per region ({args.transport}); KV {args.kv}: {p.cap} slots per core, {p.capacity()} tokens",
              file=sys.stderr)
        total = len(prompt_ids) + args.max_new_tokens
        layers = tqdm(total=sum(r.layers + r.head for r in p.regions), desc="prefill", unit="layer", leave=False,
                      file=sys.stderr, disable=args.prefill != "mesh")
        bar = None
        shown = [""]
        clock = _LayerClock()

        def on_layer(done: int, total: int) -> None:
            layers.update(1)
            left = clock.left(done, total)
            if done == 2 and left > LONG_S:
                layers.clear()
                print(f"wafer-llm: warning: the prefill of {len(prompt_ids)} tokens will take about {left / 60:.0f} more "
                      f"minutes on this machine ({total} layers); a shorter prompt, a smaller --mesh or --prefill token "
                      "is faster", file=sys.stderr)

        def on_token(i: int, token: int) -> None:
            nonlocal bar
            if drain and i == len(prompt_ids) + drain[1] - 1:
                _drain_node(engine, drain[0])
            if bar is None:  # the first token counts from the start, so the rate is that of the decode steps after it
                if args.prefill == "mesh" and i < len(prompt_ids):
                    return  # a prefilled prompt's tokens all come at once, and the first new one with them
                layers.close()
                bar = tqdm(total=total, initial=i + 1, desc="decode", unit="tok", leave=False, file=sys.stderr)
            else:
                bar.update(1)
            if i >= len(prompt_ids):  # stream the answer as it grows (decode whole: multi-byte characters)
                so_far = tok.decode(out_ids + [token])
                out_ids.append(token)
                new = so_far[len(shown[0]):]
                shown[0] = so_far
                bar.clear()
                print(new, end="", flush=True)
                bar.refresh()

        out_ids: list[int] = []
        print(text, end="", flush=True)
        try:
            result = generate(engine, prompt_ids, max_new_tokens=args.max_new_tokens, sampler=sampler,
                              stop_ids=tok.stop_ids, prefill=args.prefill, on_token=on_token, on_layer=on_layer)
            engine.finish_migration()  # a drain whose copy outlasted the decode still completes (and is reported)
        except KeyboardInterrupt:  # the text so far is on stdout already; the tiles stop as the engine closes
            layers.close()
            if bar is not None:
                bar.close()
            print(f"\nwafer-llm: interrupted after {len(out_ids)} new token(s)", file=sys.stderr)
            raise
        layers.close()
        if bar is not None:
            bar.close()
        print()
        summary = engine.summary()
        if engine.trace:  # every decode step run (the prompt's too with --prefill token), operation by operation
            first = len(prompt_ids) if result.prefill else 0
            summary["predicted"]["decode_ops"] = op_utilisation(cfg, device, engine.dtype, engine.placement.cores,
                                                                engine.totals.steps, first)
        if args.heatmap:
            heat = heatmap_data(engine)
            draw(heat, args.heatmap, device.sram_bytes, f"{cfg.name} on {device.name}: {len(prompt_ids)} prompt tokens, "
                 f"{len(result.output_ids)} new ({args.prefill} prefill)")
            summary["heatmap"] = heatmap_json(heat)
    for m in summary["migrations"]:
        print(f"wafer-llm: moved tiles {list(m['tiles'])} of region {m['region']} to node {m['node'][:12]} while decoding "
              f"(pause {1e3 * m['pause_s']:.0f} ms)", file=sys.stderr)
    for r in summary["recoveries"]:
        print(f"wafer-llm: tile {r['tile']} on node {r['node'][:12]} was lost ({r['reason']}); started the wafer again "
              f"and replayed {r['replayed_tokens']} tokens in {r['host_s']:.1f} s", file=sys.stderr)
    pred, emu = summary["predicted"], summary["emulation"]
    timing = result.timing(device.clock_hz)
    pred.update(timing)
    pred["utilisation"] = util = generation_utilisation(
        engine.cfg, device, engine.dtype, engine.placement.cores, len(result.prompt_ids), result.prefill_mode,
        result.ttft_cycles, result.decode_steps, result.decode_cycles)
    if result.prefill:
        emu["prefill_s"] = result.prefill.host_s
    print(
        f"predicted on {pred['device']} ({pred['regions']} region(s)): prefill ({args.prefill}) of {len(prompt_ids)} tokens "
        f"{1e3 * timing['ttft_s']:.3f} ms to first token | decode step {pred['cycles_per_step']:,.0f} cycles = "
        f"{pred['steps_per_s']:,.0f} steps/s; after the first token {timing['decode_tokens_per_s']:,.0f} tokens/s "
        f"(hand-over included) | end to end {timing['e2e_tokens_per_s']:,.0f} tokens/s | emulation: "
        + (f"prefill {result.prefill.host_s:.1f} s, " if result.prefill else "")
        + f"{emu['ms_per_token']:.0f} ms/decode step | decode MBU {_percent(util['decode'], 'mbu')} MFU "
        f"{_percent(util['decode'], 'mfu')} of the wafer ({_percent(util['decode'], 'mbu_cores_used')} / "
        f"{_percent(util['decode'], 'mfu_cores_used')} of the cores in use) | SRAM high-water {emu['sram_high_water_bytes']} of "
        f"{emu['sram_bytes']} B per core | stop: {result.stop}",
        file=sys.stderr,
    )
    if args.trace:
        write_trace(args.trace, trace_events(engine, result, args.trace_detail))
    if args.json:
        report = {"model": cfg.name, "prompt_ids": result.prompt_ids, "output_ids": result.output_ids,
                  "text": tok.decode(result.output_ids), "stop": result.stop, **summary}
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _generate_cost_only(args: argparse.Namespace) -> int:
    """``generate --cost-only``: a preset model's shapes on the whole device (``llm.whole_device``)."""
    from tqdm import tqdm

    from .config import preset
    from .whole_device import run_whole

    if args.prompt is not None or args.chat is not None:
        raise InvalidArgument("--cost-only runs shapes, not text: give --prompt-tokens N instead of --prompt/--chat")
    if args.prompt_tokens is None or args.prompt_tokens < 1:
        raise InvalidArgument(f"--cost-only needs --prompt-tokens N (N >= 1), got {args.prompt_tokens}")
    given = {"--transport": args.transport, "--tiles": args.tiles, "--regions": args.regions, "--address": args.address,
             "--prefill": args.prefill != "mesh", "--heatmap": args.heatmap, "--trace": args.trace,
             "--drain-node": args.drain_node, "--snapshot-every": args.snapshot_every, "--on-failure": args.on_failure != "recover",
             "--temperature": args.temperature, "--top-k": args.top_k, "--top-p": args.top_p != 1.0, "--seed": args.seed}
    for flag, value in given.items():
        if value:
            raise InvalidArgument(f"{flag} does not apply to --cost-only runs (shapes only, in-process, one tile per "
                                  "region, as many regions as the model needs, the prompt prefilled on the mesh)")
    cfg = preset(args.model)
    device = resolve(args.device or "wse2")
    side = None
    if args.mesh not in (None, "full"):
        rows, cols = parse_grid(args.mesh)
        if rows != cols:
            raise InvalidArgument(f"--cost-only regions are square (prefill runs MeshGEMM on them), got --mesh {args.mesh}")
        device.check_mesh(rows, cols)
        side = rows
    bar = tqdm(desc="prefill", unit="layer", leave=False, file=sys.stderr, delay=1)

    clock = _LayerClock()

    def on_layer(done: int, total: int) -> None:
        bar.total = total
        bar.update(1)
        left = clock.left(done, total)
        if done == 2 and left > LONG_S:
            bar.clear()
            print(f"wafer-llm: warning: the prefill of {args.prompt_tokens} tokens will take about {left / 60:.0f} more "
                  f"minutes on this machine ({total} layers); --one-layer measures one layer and scales it",
                  file=sys.stderr)

    try:
        r = run_whole(cfg, device, args.prompt_tokens, args.max_new_tokens, side=side, one_layer=args.one_layer,
                      kv=args.kv, algo=args.algo, executor=args.executor, on_layer=on_layer)
    finally:
        bar.close()
    where = (f"{r['regions']} region(s) of {r['side']}x{r['side']} cores in snake order ({r['regions_fit']} fit the fabric; "
             f"{r['idle_cores']:,} cores idle)" if r["regions"] else f"one {r['side']}x{r['side']}-core region")
    print(f"{cfg.name} (float16, cost-only) on {device.name}: {where}; {r['method']}")
    print(f"prefill of {r['prompt_tokens']} tokens: {1e3 * r['ttft_s']:.3f} ms to the first token")
    if r["decode_cycles_per_token"] is not None:
        handoff = ("" if r["handoff_cycles_per_token"] is None else
                   f"; region hand-offs (transfers) {r['handoff_cycles_per_token']:,.0f} cycles per token")
        print(f"decode: {r['decode_cycles_per_token']:,.0f} cycles per token = {r['decode_tps']:,.1f} tokens/s{handoff}")
    if r["handover_cycles"] is not None:
        print(f"between the first and second token: KV hand-over and weights back to decode's layout "
              f"{r['handover_cycles']:,.0f} cycles")
    print(f"{'region':>6} {'origin':>12} {'layers':>8} {'SRAM high-water B':>18} {'prefill cycles':>15} {'decode cycles':>14}")
    for row in r["region_table"]:
        layers = f"{row['layers']}{'+head' if row['lm_head'] else ''}"
        dec = "" if row["decode_cycles"] is None else f"{row['decode_cycles']:,.0f}"
        print(f"{row['region']:>6} {str(tuple(row['origin'])):>12} {layers:>8} {row['sram_high_water_bytes']:>18,} "
              f"{row['prefill_cycles']:>15,.0f} {dec:>14}")
    per_token = "" if r["decode_host_s_per_token"] is None else f", {r['decode_host_s_per_token']:.1f} s per decoded token"
    print(f"host time {r['host_s']:.1f} s{per_token}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Write a model in the tiles' layout (one shard file per tile) for fast starts; see ``llm.converted``."""
    from tqdm import tqdm

    from .checkpoint import LlamaWeights, default_model_path
    from .converted import DTYPES, convert, source_digest
    from .models import DEFAULT_MODEL, load_model
    from .placement import default_mesh

    tiles, device = parse_grid(args.tiles), resolve(args.device)
    if args.mesh:
        device.check_mesh(*parse_grid(args.mesh))
    if args.dtype not in DTYPES:
        raise InvalidArgument(f"--dtype must be one of {DTYPES}, got {args.dtype!r}")
    if args.tokens < 1 or args.prefill_tokens < 0:
        raise InvalidArgument(f"--tokens must be at least 1 and --prefill-tokens at least 0, got {args.tokens} and "
                              f"{args.prefill_tokens}")
    out = Path(args.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidArgument(f"{out} exists and is not an empty directory: convert into a new one")
    t0 = time.perf_counter()
    cfg, weights, tok = load_model(args.model)
    if not isinstance(weights, LlamaWeights):
        raise InvalidArgument(f"{args.model} is converted already: convert its source model")
    mesh = parse_grid(args.mesh) if args.mesh else default_mesh(cfg, device, args.tokens, prefill_tokens=args.prefill_tokens)
    source = default_model_path() if args.model == DEFAULT_MODEL else Path(args.model)
    digest = source_digest(source)
    bar = tqdm(desc="convert", unit="B", unit_scale=True, leave=False, file=sys.stderr)
    index = convert(cfg, weights, tok, out, mesh=mesh, device=device, tiles=tiles, regions=args.regions, kv=args.kv,
                    tokens=args.tokens, prefill_tokens=args.prefill_tokens, dtype=args.dtype, source=str(source),
                    digest=digest, progress=_progress(bar))
    bar.close()
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"converted {cfg.name} for {len(index['regions'])} region(s) of {mesh[0]}x{mesh[1]} cores of {device.name}, "
          f"{tiles[0]}x{tiles[1]} tiles, {args.dtype}: {size / 2**20:,.0f} MiB in {out} "
          f"({time.perf_counter() - t0:.1f} s); run it with `wafer-llm generate --model {out} ...`", file=sys.stderr)
    return 0


def _progress(bar: Any) -> Any:
    """A ``(done, total)`` callback that moves the tqdm ``bar``."""
    def update(n: int, total: int) -> None:
        bar.total = total
        bar.update(n)
    return update


def _drain(value: str | None, transport: str) -> tuple[str, int] | None:
    """``--drain-node NODE:N`` as (node id prefix, N), checked before any work."""
    if value is None:
        return None
    prefix, _, n = value.rpartition(":")
    if not prefix or not n.isdigit() or int(n) < 1:
        raise InvalidArgument(f"--drain-node takes NODE:N (a node id or its prefix, N new tokens >= 1), got {value!r}")
    if transport != "ray":
        raise InvalidArgument("--drain-node moves Ray tiles between nodes: it needs --transport ray")
    return prefix, int(n)


def _alive_node(prefix: str) -> str:
    """The one alive Ray node (of several) whose id starts with ``prefix``, for ``--drain-node``."""
    import ray

    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    node = [a for a in alive if a.startswith(prefix)]
    if len(node) != 1 or len(alive) < 2:
        raise InvalidArgument(f"--drain-node {prefix!r} must name one of several alive Ray nodes; it matches "
                              f"{len(node)} of: {', '.join(alive)}")
    return node[0]


def _drain_node(engine: Any, node: str) -> None:
    """Move every tile on ``node`` to the first other alive node (one migration per region)."""
    import ray

    target = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != node)
    nodes, per = engine.wafer.nodes(), engine.tiles[0] * engine.tiles[1]
    for region in range(len(engine.wafer.regions)):
        tiles = [i for i in range(per) if nodes[region * per + i] == node]
        if tiles:
            engine.migrate(target, tiles=tiles, region=region)


def _int_list(text: str, flag: str) -> list[int]:
    """Comma-separated positive integers ('' gives none)."""
    values = []
    for part in filter(None, (t.strip() for t in text.split(","))):
        if not part.isdigit() or int(part) < 1:
            raise InvalidArgument(f"{flag} takes comma-separated positive integers, got {part!r} in {text!r}")
        values.append(int(part))
    return values


def cmd_validate(args: argparse.Namespace) -> int:
    """Predict the paper's settings with the calibrated device; compare the calibration rows."""
    from tqdm import tqdm

    from . import validate

    device = resolve(args.device)
    models = [m.strip() for m in args.models.split(",")]
    for m in models:
        if m not in validate.MODELS:
            raise InvalidArgument(f"unknown model {m!r} for validate; choose from {', '.join(validate.MODELS)}")
    grids = _int_list(args.grids, "--grids")
    prefill_grids = _int_list(args.prefill_grids, "--prefill-grids")
    gemv_sizes = _int_list(args.gemv_sizes, "--gemv-sizes")
    for g in grids + prefill_grids + [args.gemv_grid, args.kv_grid] + ([args.gemm_grid] if args.gemm_grid else []):
        device.check_mesh(g, g)
    if args.workers < 1:
        raise InvalidArgument(f"--workers must be at least 1, got {args.workers}")
    kernels = tuple(check_kernel(k.strip()) for k in args.kernels.split(","))
    steps = len(models) * len(kernels) * (len(grids) + len(prefill_grids)) + 1 + bool(gemv_sizes) + (2 if args.gemm_grid else 0)
    bar = tqdm(total=steps, desc="validate", unit="step", leave=False, file=sys.stderr)

    def progress(what: str) -> None:
        bar.set_postfix_str(what)
        bar.update(1)

    rows = validate.run(device, models=models, grids=grids, prefill_grids=prefill_grids, prefill_tokens=args.prefill_tokens,
                        gemv_grid=args.gemv_grid,
                        gemv_sizes=tuple(gemv_sizes), gemm_grid=args.gemm_grid or None,
                        gemm_n=args.gemm_n, kv_grid=args.kv_grid, workers=args.workers, executor=args.executor,
                        kernels=kernels, progress=progress, trace=args.trace is not None)
    bar.close()
    if args.trace:
        write_trace(args.trace, rows_trace(rows, device.clock_hz, device.name, args.trace_detail))
        for r in rows:  # the JSON report keeps the rows' figures; the phases are in the trace
            r.pop("phases", None)
    print(f"device {device.name}: alpha {device.alpha:g}, beta {device.beta:g} cycles per relay, "
          f"float16 {device.rate('float16'):g} FMAC/cycle, task switch {device.task_overhead:g} cycles, "
          f"@map set-up {device.map_overhead:g} cycles, vector instruction {device.call_overhead:g} cycles")
    print(f"{'model':<14} {'kernel':<8} {'phase':<7} {'grid':>5} {'cycles/layer':>13} {'tok/s':>9} {'paper':>8} {'error':>7} "
          f"{'SRAM B':>7} {'regions':>8} {'host s':>7}  note")
    for r in rows:
        if r.get("phase") and "failed" in r:
            print(f"{r['model']:<14} {r['kernel']:<8} {r['phase']:<7} {r['grid']:>5}  {r['failed']}")
        elif r.get("phase"):
            paper = f"{r['paper_tps']:8.1f}" if r["paper_tps"] else f"{'-':>8}"
            err = f"{r['error']:+7.1%}" if r["error"] is not None else f"{'-':>7}"
            print(f"{r['model']:<14} {r['kernel']:<8} {r['phase']:<7} {r['grid']:>5} {r['predicted_cycles_per_layer']:>13,.0f} "
                  f"{r['predicted_tps']:>9.1f} {paper} {err} {r['sram_high_water_bytes']:>7} {r['regions_needed'] or '-':>8} "
                  f"{r['host_s']:>7.1f}  {r['note']}")
    for r in rows:
        if r.get("kind") == "gemv":
            print(f"GEMV {r['N'] // 1024}K on {r['grid']}x{r['grid']}: MeshGEMV {r['meshgemv_cycles']:,.0f} cycles, "
                  f"pipeline allreduce {r['pipeline_cycles']:,.0f} cycles: {r['ratio']:.2f}x")
        elif r.get("kind") == "gemm":
            detail = r["failed"].split(";")[0] if "failed" in r else f"{r['cycles']:,.0f} cycles, efficiency {r['efficiency']:.1%}"
            print(f"GEMM {r['N']}^3 on {r['grid']}x{r['grid']}: {r['algo']:<12} {detail}")
        elif r.get("kind") in ("fig9_efficiency", "fig9_latency"):
            detail = r["failed"].split(";")[0] if "failed" in r else f"{r['cycles']:,.0f} cycles, efficiency {r['efficiency']:.1%}"
            print(f"Fig. 9 check, GEMM {r['N']}^3 on {r['grid']}x{r['grid']}: {r['algo']:<12} {detail}  (paper: {r['paper']})")
        elif r.get("kind") == "kv_capacity" and "failed" in r:
            print(f"KV capacity, LLaMA3-8B on {r['grid']}x{r['grid']}: {r['failed']}")
        elif r.get("kind") == "kv_capacity":
            print(f"KV capacity, LLaMA3-8B float16 on {r['regions']} regions of {r['grid']}x{r['grid']}: concat {r['concat']:,} "
                  f"tokens, shift {r['shift']:,} tokens ({r['ratio']:.0f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.plot:
        validate.plot(rows, args.plot)
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    """Strong or weak scaling of a workload over tile actors on the connected Ray cluster."""
    from tqdm import tqdm

    from . import scale

    counts = _int_list(args.nodes_or_tiles, "--nodes-or-tiles")
    if not counts:
        raise InvalidArgument("--nodes-or-tiles needs at least one tile-actor count, e.g. 1,2,4")
    bar = tqdm(total=len(counts), desc="scale", unit="point", leave=False, file=sys.stderr)

    def progress(what: str) -> None:
        bar.set_postfix_str(what)
        bar.update(1)

    rows = scale.run(args.mode, counts, args.workload, side=args.mesh_side, per_core=args.per_core, tokens=args.tokens,
                     executor=args.executor, model=args.model, layers=args.layers, progress=progress)
    bar.close()
    print(f"{args.mode} scaling, {args.workload}: host wall time, speedup, actor messages inside/across nodes, invariance")
    print(f"{'tiles':>5} {'mesh':>9} {'nodes':>5} {'wall s':>8} {'speedup':>7} {'effic.':>7} {'msgs in':>8} {'msgs across':>11} "
          f"{'MB in':>7} {'MB across':>9} {'cycles':>10}  same result/cycles")
    for r in rows:
        print(f"{r['tiles']:>5} {r['mesh'][0]:>4}x{r['mesh'][1]:<4} {r['nodes']:>5} {r['wall_s']:>8.2f} {r['speedup']:>7.2f} "
              f"{r['efficiency']:>7.2f} {r['messages_inside_nodes']:>8} {r['messages_across_nodes']:>11} "
              f"{r['bytes_inside_nodes'] / 1e6:>7.2f} {r['bytes_across_nodes'] / 1e6:>9.2f} {r['cycles']:>10,.0f}  {r['invariant']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.plot:
        scale.plot(rows, args.plot)
    return 0 if all(r["invariant"] for r in rows) else 1


LONG_S = 600  # a prefill expected to run longer than this (host seconds) is warned about


class _LayerClock:
    """Host seconds a prefill has left, from the layers after its first: the first also builds the plans, skews the
    weights and, on a first run, compiles the kernels, so it says little about the others."""

    def __init__(self) -> None:
        self.first_end = 0.0

    def left(self, done: int, total: int) -> float:
        now = time.perf_counter()
        if done == 1:
            self.first_end = now
            return 0.0
        return (now - self.first_end) / (done - 1) * (total - done)


EXECUTOR_ARG = dict(default="fused", choices=["fused", "step"],
                    help="fused (default): collectives as compiled loops over each tile's cores, one message per "
                         "neighbour and stretch of steps; step: step by step, the specification (same values and cycles)")
ADDRESS_HELP = "Ray cluster to join: auto, HOST:PORT or ray://HOST:PORT (default: start Ray on this machine)"
CONNECT_S = 10.0  # how long to wait for a cluster address to answer


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="wafer-llm", description="Wafer-scale LLM inference on an emulated wafer.")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("devices", help="list device presets").set_defaults(fn=cmd_devices)
    demo = sub.add_parser("demo", help="run the fabric protocols on an emulated wafer and check them against NumPy")
    demo.add_argument("--mesh", default="32x32", help="cores, ROWSxCOLS (default 32x32)")
    demo.add_argument("--tiles", default="2x2", help="tile actors, ROWSxCOLS (default 2x2)")
    demo.add_argument("--transport", default="ray", choices=["ray", "local"])
    demo.add_argument("--address", default=None, help=ADDRESS_HELP)
    demo.add_argument("--device", default="wse2", help="preset name or a .toml/.json device file")
    demo.add_argument("--block", type=int, default=64, help="float32 elements per core")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(fn=cmd_demo)

    gen = sub.add_parser("generate", help="decode a prompt with a real model on an emulated wafer")
    gen.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), a .gguf file, a Hugging Face directory "
                     "or a directory written by `wafer-llm convert`")
    what = gen.add_mutually_exclusive_group()
    what.add_argument("--prompt", help="raw prompt text (special tokens such as <|im_start|> are parsed)")
    what.add_argument("--chat", help="a user message, wrapped in the model's chat template")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--cost-only", action="store_true",
                     help="a preset model's shapes (llama3-8b, ...), no weights, laid over the whole device: predicted "
                          "time to first token, tokens/s and per-region memory (with --prompt-tokens)")
    gen.add_argument("--prompt-tokens", type=int, default=None, help="--cost-only: the prompt's length in tokens")
    gen.add_argument("--one-layer", action="store_true",
                     help="--cost-only: measure one layer on one region and scale by the layer count (as the paper "
                          "did), for models the device cannot hold")
    gen.add_argument("--mesh", default=None, help="cores per region, ROWSxCOLS (default: the smallest square region that "
                     "holds the model; a converted model's mesh); with --cost-only, SIDExSIDE or full (default: the "
                     "side whose regions use the most of the fabric)")
    gen.add_argument("--regions", type=int, default=None, help="spread the layers over at least this many regions (default 1; "
                     "a converted model's)")
    gen.add_argument("--tiles", default=None, help="tile actors per region, ROWSxCOLS (default 1x1; a converted model's)")
    gen.add_argument("--transport", default=None, choices=["ray", "local"], help="ray (default) or local (in-process)")
    gen.add_argument("--address", default=None, help=ADDRESS_HELP)
    gen.add_argument("--device", default=None, help="preset name or a .toml/.json device file (default wse2; a converted "
                     "model's)")
    gen.add_argument("--kv", default="shift", choices=["shift", "concat"], help="KV cache: WaferLLM's shift or the concat baseline")
    gen.add_argument("--algo", default="ktree", choices=["ktree", "pipeline", "ring", "chain"], help="allreduce of every GEMV")
    gen.add_argument("--prefill", default="mesh", choices=["mesh", "token"],
                     help="mesh (default): the whole prompt at once with MeshGEMM (square regions); token: one decode step per prompt token")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--json", default=None, help="write prompt/output ids, text and the predicted and emulation figures here")
    gen.add_argument("--heatmap", default=None, metavar="OUT.png",
                     help="draw per-core SRAM high-water, compute cycles and bytes per link of each region (and put the "
                          "data, downsampled, in --json)")
    _trace_args(gen)
    gen.add_argument("--executor", **EXECUTOR_ARG)
    gen.add_argument("--drain-node", default=None, metavar="NODE:N",
                     help="after N new tokens, move every tile on the Ray node whose id starts with NODE to another "
                          "node while decode goes on (planned migration; Ray tiles)")
    gen.add_argument("--snapshot-every", type=int, default=0, metavar="N",
                     help="with --on-failure recover, copy the tiles' KV cache and activations to the host every N "
                          "decode steps, so a recovery replays only the steps since (default 0: replay it all)")
    gen.add_argument("--on-failure", default="recover", choices=["recover", "fail"],
                     help="when a Ray tile or node is lost: start the wafer again on the surviving nodes and replay the "
                          "sequence (recover, default; tokens and predicted cycles unchanged), or stop with an error (fail)")
    gen.set_defaults(fn=cmd_generate)

    conv = sub.add_parser("convert", help="write a model in the tiles' layout, one shard file per tile, for fast starts")
    conv.add_argument("model", help="smollm2-135m, a .gguf file or a Hugging Face directory")
    conv.add_argument("out_dir", help="a new (or empty) directory")
    conv.add_argument("--mesh", default=None, help="cores per region, ROWSxCOLS (default: the smallest square region that "
                      "holds the model with --tokens of KV cache and room to prefill --prefill-tokens)")
    conv.add_argument("--regions", type=int, default=1, help="spread the layers over at least this many regions")
    conv.add_argument("--tiles", default="1x1", help="tile actors per region, ROWSxCOLS")
    conv.add_argument("--device", default="wse2", help="preset name or a .toml/.json device file")
    conv.add_argument("--kv", default="shift", choices=["shift", "concat"], help="KV cache the placement makes room for")
    conv.add_argument("--tokens", type=int, default=64, help="KV entries the placement makes room for (default 64)")
    conv.add_argument("--prefill-tokens", type=int, default=64, help="prompt length the placement keeps room to prefill "
                      "on the wafer (default 64; 0: none)")
    conv.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                      help="weights in the files (float16: half the bytes, the weights rounded; tiles compute in float32)")
    conv.set_defaults(fn=cmd_convert)

    val = sub.add_parser("validate", help="predict the paper's decode and prefill settings with the calibrated cost model")
    val.add_argument("--device", default="wse2", help="preset name or a .toml/.json device file")
    val.add_argument("--models", default="llama3-8b,llama2-13b,codellama-34b,qwen2-72b")
    val.add_argument("--grids", default="420,540,660", help="decode grids P (P x P cores)")
    val.add_argument("--prefill-grids", default="480,600,720", help="prefill grids P ('' for none; 720 takes 8-16 s per model and kernel)")
    val.add_argument("--prefill-tokens", type=int, default=4096, help="prompt length of the prefill rows (the paper's 4096)")
    val.add_argument("--gemv-grid", type=int, default=720, help="grid of the MeshGEMV vs pipeline comparison")
    val.add_argument("--gemv-sizes", default="16384,32768", help="GEMV sizes N ([1,N] x [N,N]) of that comparison ('' for none)")
    val.add_argument("--gemm-grid", type=int, default=720, help="grid of the MeshGEMM vs Cannon/SUMMA comparison (0: skip; 720 takes minutes, mostly SUMMA)")
    val.add_argument("--gemm-n", type=int, default=2048, help="GEMM size N (N x N times N x N)")
    val.add_argument("--kv-grid", type=int, default=360, help="region side for the KV capacity of LLaMA3-8B")
    val.add_argument("--workers", type=int, default=1, help="processes computing rows at once (one per core helps)")
    val.add_argument("--json", default=None, help="write the rows as a JSON list")
    _trace_args(val)
    val.add_argument("--plot", default=None, help="draw predicted vs paper tokens/s to this PNG")
    val.add_argument("--kernels", default="paper,faithful",
                     help="paper: the authors' measured kernel (one head, rounded shapes; what calibration fits); "
                          "faithful: the real model (GQA, causal mask)")
    val.add_argument("--executor", **EXECUTOR_ARG)
    val.set_defaults(fn=cmd_validate)

    sc = sub.add_parser("scale", help="strong/weak scaling of a workload over tile actors and cluster nodes")
    sc.add_argument("--mode", default="strong", choices=["strong", "weak"])
    sc.add_argument("--nodes-or-tiles", default="1,2,4", help="tile-actor counts, comma-separated (tiles spread over all nodes)")
    sc.add_argument("--workload", default="gemv", choices=["gemv", "gemm", "decode"])
    sc.add_argument("--mesh-side", type=int, default=None,
                    help="mesh side at the first point (default: 32 for gemv and gemm; for decode the smallest square "
                         "region that holds the model)")
    sc.add_argument("--per-core", type=int, default=8, help="GEMV/GEMM matrix side per mesh side")
    sc.add_argument("--tokens", type=int, default=3, help="new tokens per decode point")
    sc.add_argument("--model", default="smollm2-135m",
                    help="what decode runs: smollm2-135m (default), a checkpoint as for generate, or random:PRESET, "
                         f"seeded weights of a preset's shape ({', '.join(PRESETS)})")
    sc.add_argument("--layers", type=int, default=None, help="keep the first N layers of a random:PRESET model")
    sc.add_argument("--address", default=None, help=ADDRESS_HELP)
    sc.add_argument("--json", default=None)
    sc.add_argument("--plot", default=None)
    sc.add_argument("--executor", **EXECUTOR_ARG)
    sc.set_defaults(fn=cmd_scale)

    bench = sub.add_parser("bench", help="predicted cost of GEMV/GEMM protocols on the device")
    ops = bench.add_subparsers(dest="op", required=True)
    for op, algos, default in (("gemv", "meshgemv|pipeline|ring", "meshgemv"), ("gemm", "meshgemm|cannon|summa|gemm_t", "meshgemm")):
        b = ops.add_parser(op, help=f"benchmark {op.upper()}")
        b.add_argument("--P", type=int, default=64, help="mesh side: P x P cores (default 64)")
        b.add_argument("--M", type=int, default=4096)
        if op == "gemm":
            b.add_argument("--K", type=int, default=4096)
            b.add_argument("--relay", action="store_true", help="SUMMA's broadcasts charged as relayed core to core (beta per core on the way, "
                           "neighbour-hop routes) instead of one route per source; the relay cores are not emulated")
        else:
            b.add_argument("--group-num", type=int, default=None, help="K-tree groups (default: near sqrt(P))")
        b.add_argument("--N", type=int, default=4096)
        b.add_argument("--algo", default=default, help=f"{algos}, or several separated by commas")
        b.add_argument("--device", default="wse2", help="preset name or a .toml/.json device file")
        b.add_argument("--tiles", default="1x1", help="tile actors, ROWSxCOLS")
        b.add_argument("--transport", default="local", choices=["local", "ray"])
        b.add_argument("--address", default=None, help=ADDRESS_HELP)
        b.add_argument("--dtype", default="float16", choices=["float16", "float32"])
        b.add_argument("--cost-only", action="store_true", help="shapes only, no tensors (for 360x360 and larger meshes)")
        b.add_argument("--sweep-P", default=None, help="comma-separated P values, e.g. 64,128,256,360,720")
        b.add_argument("--json", default=None, help="write the results as JSON to this file")
        b.add_argument("--plot", default=None, help="draw predicted latency against P to this PNG")
        b.add_argument("--executor", **EXECUTOR_ARG)
        _trace_args(b)
        b.set_defaults(fn=cmd_bench)
    return ap


def _trace_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", default=None, metavar="OUT.json",
                        help="write a timeline of predicted device time and host time (Trace Event Format: open it in "
                             "Perfetto or chrome://tracing)")
    parser.add_argument("--trace-detail", choices=DETAILS, default="op",
                        help="spans down to each GEMM step inside an operation (all), each operation (op, default), "
                             "each layer, or each decode step (smaller files)")


def _connect(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``) and say so on stderr.

    Raises:
        ConnectionError: nothing answers at ``HOST:PORT`` within ``CONNECT_S`` (Ray itself
            would retry for minutes).
    """
    if not address:
        return
    import ray

    from wafer_actors.fabric.ray import describe_cluster

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if host and port.isdigit():
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_S).close()
        except OSError as err:
            raise ConnectionError(f"no Ray cluster answers at {address} ({err}); start one there with "
                                  "`ray start --head`, or give the address it printed") from None
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
        print(f"wafer-llm: joined {describe_cluster()}", file=sys.stderr)


def _start_ray() -> None:
    """Without ``--address``: a private local Ray instance, even where a cluster runs on this machine (Ray alone
    would join it), or the cluster ``RAY_ADDRESS`` names (a Ray job); say which on stderr."""
    import ray

    from wafer_actors.fabric.ray import describe_cluster, start_local_ray

    if ray.is_initialized():
        return
    start_local_ray()
    if os.environ.get("RAY_ADDRESS"):
        print(f"wafer-llm: joined {describe_cluster()} (RAY_ADDRESS)", file=sys.stderr)
    else:
        print(f"wafer-llm: started a private {describe_cluster()}; give --address auto to join a running cluster "
              "instead", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run a command. Exit status 2 with a one-line message for bad input (``InputError``: a value, a size that does
    not fit, a bad checkpoint; a missing file; a cluster that cannot be reached); 3 for a tile lost and not
    recovered (``--on-failure fail``, or it kept failing); 130 on Ctrl-C; any other error is a bug and
    propagates with its traceback (exit 1)."""
    args = build_parser().parse_args(argv)
    try:
        _connect(getattr(args, "address", None))
        return args.fn(args)
    except (InputError, FileNotFoundError, ConnectionError) as err:
        print(f"wafer-llm: error: {err}", file=sys.stderr)
        return 2
    except TileLost as err:
        print(f"wafer-llm: error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130  # 128 + SIGINT, as a shell reports it; the Ray instance we started stops at exit


if __name__ == "__main__":
    sys.exit(main())
