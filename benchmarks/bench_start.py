"""Start-up: time from process start until the first token can run, for the three ways to give a model.

The default model is written, in this run, as a Hugging Face directory (bfloat16 safetensors,
as the model is published) and as a converted checkpoint (``wafer-llm convert``, float32,
tiles 1x1 on the main job's 120x120 mesh). Each path then starts in a fresh Python process
(imports, reading, placement: until ``WaferLlama`` is ready) with its files evicted from the
page cache first (``posix_fadvise(DONTNEED)``: a cold read from disk, as on a fresh node); the
three paths are interleaved ``--repeat`` times and the fastest of each is shown.
The converted path's read bandwidth (weight bytes / seconds the tiles spent placing them) is
compared with the disk's sequential read bandwidth, measured the same way on a file of the
same size.

    python benchmarks/bench_start.py [--transport local|ray] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from llm.engine import WaferLlama
from llm.models import load_model
cfg, weights, tok = load_model(sys.argv[1])
t1 = time.perf_counter()
if sys.argv[2] == "ray":  # Ray's own start, apart
    from wafer_actors.fabric.ray import start_local_ray
    start_local_ray()
t2 = time.perf_counter()
kw = dict(transport=sys.argv[2], tokens=64)
if hasattr(weights, "index"):
    m = WaferLlama.from_converted(sys.argv[1], **kw)
else:
    m = WaferLlama(cfg, weights, mesh=(120, 120), **kw)
t3 = time.perf_counter()
print(json.dumps({"ready_at": time.time(), "open_s": t1 - t0, "ray_s": t2 - t1, "place_s": t3 - t2,
                  "bytes": m.weight_bytes()}), flush=True)
m.close()
"""


def evict(path: Path) -> None:
    """Drop ``path``'s pages (a file, or every file under a directory) from the page cache."""
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def start(model: str, files: Path, transport: str) -> dict:
    """One cold start in a fresh process: seconds from its launch until the model is placed (its exit not counted)."""
    evict(files)
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", CHILD, model, transport], capture_output=True, text=True, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["start_s"] = row["ready_at"] - t0
    return row


def disk_read_bandwidth(folder: Path, nbytes: int) -> float:
    """Bytes per second of one cold sequential read of a fresh file of ``nbytes`` (16 MiB reads into one buffer)."""
    path = folder / "scratch.bin"
    block = np.random.default_rng(0).integers(0, 255, 16 << 20, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        for _ in range(-(-nbytes // len(block))):
            f.write(block)
    evict(path)
    buf = np.empty(os.path.getsize(path), np.uint8)
    view = memoryview(buf)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    done = 0
    while done < len(buf):
        done += os.preadv(fd, [view[done : done + (16 << 20)]], done)
    os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return len(buf) / seconds


def write_hf(path: Path, cfg, w, tok) -> None:
    """The model as a Hugging Face Llama directory: bfloat16 safetensors, RoPE columns in rotate-half order."""
    from safetensors.numpy import save_file

    def half_split(m: np.ndarray, heads: int) -> np.ndarray:  # adjacent RoPE pairs -> rotate-half columns
        cols = m.reshape(m.shape[0], heads, cfg.head_dim // 2, 2)
        return np.concatenate([cols[..., 0], cols[..., 1]], axis=2).reshape(m.shape)

    t = {"model.embed_tokens.weight": w.tok_embeddings, "model.norm.weight": w.final_norm}
    if not cfg.tied_embeddings:
        t["lm_head.weight"] = w.lm_head.T
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": w.attn_norm[i], p + "post_attention_layernorm.weight": w.ffn_norm[i],
              p + "self_attn.q_proj.weight": half_split(w.wq[i], cfg.n_heads).T,
              p + "self_attn.k_proj.weight": half_split(w.wk[i], cfg.n_kv_heads).T,
              p + "self_attn.v_proj.weight": w.wv[i].T, p + "self_attn.o_proj.weight": w.wo[i].T,
              p + "mlp.gate_proj.weight": w.w_gate[i].T, p + "mlp.up_proj.weight": w.w_up[i].T,
              p + "mlp.down_proj.weight": w.w_down[i].T}
    path.mkdir()
    save_file({k: np.ascontiguousarray(v).astype(ml_dtypes.bfloat16) for k, v in t.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "vocab_size": cfg.vocab_size, "rope_theta": cfg.rope_base,
        "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tied_embeddings,
    }))
    tok.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transport", default="local", choices=["local", "ray"])
    ap.add_argument("--repeat", type=int, default=3, help="interleaved cold starts of each path (the fastest is shown)")
    args = ap.parse_args()

    from llm.checkpoint import default_model_path
    from llm.converted import convert
    from llm.models import load_model
    from wafer_actors.device import preset

    gguf = default_model_path()
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:  # on the disk the checkpoints would live on
        tmp = Path(tmp)
        cfg, w, tok = load_model()
        write_hf(tmp / "hf", cfg, w, tok)
        convert(cfg, w, tok, tmp / "converted", mesh=(120, 120), device=preset("wse2"), tokens=64)
        del w
        paths = {"gguf (Q4_1)": ("smollm2-135m", gguf), "safetensors (bf16)": (str(tmp / "hf"), tmp / "hf"),
                 "converted (float32)": (str(tmp / "converted"), tmp / "converted")}
        rows: dict[str, list[dict]] = {k: [] for k in paths}
        for _ in range(args.repeat):
            for name, (model, files) in paths.items():
                rows[name].append(start(model, files, args.transport))
        size = sum(f.stat().st_size for f in (tmp / "converted").rglob("*.bin"))
        disk = disk_read_bandwidth(tmp, size)

    print(f"start-up of SmolLM2-135M on 120x120 cores ({args.transport} tiles), cold page cache, fastest of {args.repeat}")
    print(f"{'path':<20} {'start s':>8} {'open s':>7} {'Ray s':>6} {'place s':>8} {'x converted':>11}  (start: from process "
          "launch; open: imports and reading the model; Ray: starting Ray; place: tiles started and weights placed)")
    best = {k: min(v, key=lambda r: r["start_s"]) for k, v in rows.items()}
    conv = best["converted (float32)"]
    for name, r in best.items():
        print(f"{name:<20} {r['start_s']:>8.2f} {r['open_s']:>7.2f} {r['ray_s']:>6.2f} {r['place_s']:>8.2f} {r['start_s'] / conv['start_s']:>10.1f}x")
    bw = conv["bytes"] / conv["place_s"]
    print(f"converted: {conv['bytes'] / 2**20:,.0f} MiB read by the tiles in {conv['place_s']:.2f} s = {bw / 1e9:.2f} GB/s; "
          f"disk sequential read of {size / 2**20:,.0f} MiB: {disk / 1e9:.2f} GB/s ({bw / disk:.0%} of it)")
    print(f"target: converted start >= 5x faster than gguf ({best['gguf (Q4_1)']['start_s'] / conv['start_s']:.1f}x); "
          f"loading >= 70% of the disk's bandwidth ({bw / disk:.0%})")


if __name__ == "__main__":
    main()
