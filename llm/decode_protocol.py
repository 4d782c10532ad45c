"""One decode step of a Llama on a region of cores (WaferLLM §4.2), as a wafer protocol.

Layout on an H x W region. The hidden size is padded to D (a multiple of H), the K/V
width to KV (a multiple of 2W, so RoPE pairs never straddle two cores), the FFN size to F
and the vocabulary to V (multiples of W). G = query heads per KV head. Query heads are
regrouped as (G, KV): q[g, kvh * head_dim + d] is query head kvh * G + g, so column px
holds the queries that read the K/V columns it holds (GQA without copies).

    x, h        (D,)                 Spec("y")              dims of block py on every px
    wqkv        (L, D, G + 2, KV)    Spec(None, "y", None, "x")  reduce over y -> qkv
    qkv         (G + 2, KV)          Spec(None, "x")        q (G rows), k, v; on every py
    bqkv        (L, G + 2, KV)       Spec(None, None, "x")  their biases (Qwen2), added after the reduce
    k/v cache   (L, cap, KV)         Spec(None, None, "x")  sequence along y: row py keeps
                                                            its tokens in slots j mod cap
    scores      (n_kv, G, cmax)      row py's tokens        reduce over x
    o           (G, KV)              Spec(None, "x")        reduce over y
    wo          (L, G, KV, D)        Spec(None, None, "x", "y")  reduce over x -> back to x's layout
    w13         (L, D, 2, F)         Spec(None, "y", None, "x")  gate and up, reduce over y
    w2          (L, F, D)            Spec(None, "x", "y")   reduce over x
    lm_head     (D, V)               Spec("y", "x")         reduce over y -> logits (V,) Spec("x")

Reductions alternate between the axes so every GEMV's output is already laid out for the
next one: no transpose ever runs. Ten allreduces per layer (seven along y, three along x),
all with the same algorithm (the K-tree by default).

KV cache. After T tokens, ``kv_rows`` says how many tokens each row holds and where its
oldest one starts. ``shift``: rows hold floor or ceil of T / H tokens (the bottom T mod H
rows one more), oldest in row 0, newest in the tail row; a new entry enters at the tail
row and each of the fuller rows passes its oldest entry one hop north (one transfer along
y, all columns at once), so the rows stay balanced. ``concat``: every entry
stays in the tail row (the PagedAttention-style baseline), so one row's memory bounds the
context.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

from wafer_actors.collectives.allreduce import allreduce_routes, run_allreduce
from wafer_actors.kernels import (attention_scores, attention_values, block_vecmat, exp_sum, kv_put, kv_take,
                                  masked_max, rms_scale, rope, sum_squares, swiglu)
from wafer_actors.mesh import Mesh
from wafer_actors.program import Program, Step
from wafer_actors.protocol import protocol
from wafer_actors.transfer import Route, Transfer

KV_MODES = ("shift", "concat")


@dataclass(frozen=True)
class RegionPlan:
    """What the cores of one region need to know to run their layers (sent with every run)."""

    layers: int  # decoder layers on this region
    dim: int  # real hidden size (for the RMSNorm mean)
    groups: int  # query heads per KV head
    n_kv: int
    head_dim: int
    kv_dim: int  # real K/V width
    eps: float
    rope_freqs: tuple[float, ...]  # angle per position of each RoPE pair of a head (LlamaConfig.rope_freqs)
    cap: int  # KV slots per core
    kv_mode: str = "shift"
    head: bool = False  # final norm and LM head on this region
    algo: str = "ktree"
    K: int = 2
    group_num: int | None = None
    dtype: str = "float32"  # what the cores hold and compute in (cost-only runs may use float16)
    qkv_bias: bool = False  # q, k, v add a bias (``bqkv``) after their allreduce
    split: bool = False  # the paper kernel: q, k, v and gate, up as separate GEMVs / GEMMs, not one fused each

    def as_kwargs(self) -> dict:
        return asdict(self)


def kv_rows(mode: str, rows: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens each row holds after ``tokens`` entries, and the index of its oldest: (counts, starts)."""
    r = np.arange(rows)
    if mode == "concat":
        counts = np.where(r == rows - 1, tokens, 0)
        return counts, np.zeros(rows, dtype=np.int64)
    n, m = divmod(tokens, rows)  # the bottom m rows hold one more
    return np.where(r >= rows - m, n + 1, n), r * n + np.maximum(0, r - (rows - m))


@lru_cache(maxsize=None)
def kv_shift_transfer(mesh: Mesh, first: int) -> Transfer:
    """Rows ``first + 1 .. H - 1`` each pass one entry to the row above, on every column."""
    h = mesh.height
    return Transfer.along(mesh, "y", f"kv_north:{first}", "kv_north", np.arange(first + 1, h), np.arange(first, h - 1))


@lru_cache(maxsize=4)  # one per token, used by every layer
def _kv_shift_program(mesh: Mesh, first: int) -> Program:
    return Program(f"kv_north:{mesh.height}x{mesh.width}:{first}", (Step((kv_shift_transfer(mesh, first),)),))


@lru_cache(maxsize=64)
def _routes_cached(mesh: Mesh, algo: str, K: int, group_num: int | None, shift: bool) -> tuple[Route, ...]:
    routes = allreduce_routes(mesh, axis="y", algo=algo, K=K, group_num=group_num)
    routes += allreduce_routes(mesh, axis="x", algo=algo, K=K, group_num=group_num)
    if shift and mesh.height > 1:
        routes.append(Route("kv_north", (kv_shift_transfer(mesh, 0),)))
    return tuple(routes)


def _routes(mesh: Mesh, *, plan: dict, pos: int) -> list[Route]:
    return list(_routes_cached(mesh, plan["algo"], plan["K"], plan["group_num"], plan["kv_mode"] == "shift"))


@lru_cache(maxsize=64)
def _columns(p: RegionPlan, x0: int, x1: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per local column: the KV head of each K/V column (w, kvt; -1 for padding) and RoPE frequency (w, kvt/2)."""
    kvt = _pad(p.kv_dim, 2 * width) // width
    j = np.arange(x0 * kvt, x1 * kvt).reshape(x1 - x0, kvt)  # global K/V column
    head = np.where(j < p.kv_dim, j // p.head_dim, -1)
    pair = (j % p.head_dim)[:, 0::2] // 2  # which RoPE pair of its head
    return head, np.asarray(p.rope_freqs, dtype=np.float64)[pair]


def _pad(n: int, m: int) -> int:
    return -(-n // m) * m


def _rope(t: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
    """Rotate adjacent pairs of the last axis in place (cos/sin broadcast from (w, kvt/2))."""
    even, odd = t[..., 0::2].copy(), t[..., 1::2].copy()
    t[..., 0::2] = even * cos - odd * sin
    t[..., 1::2] = even * sin + odd * cos


async def _allreduce(tile, p: RegionPlan, buffer: str, axis: str, op: str = "add") -> None:
    await run_allreduce(tile, buffer=buffer, axis=axis, op=op, algo=p.algo, K=p.K, group_num=p.group_num)


async def _rmsnorm(tile, p: RegionPlan, weight: np.ndarray | None, dt: int) -> None:
    """h = x / rms(x) * weight, the sum of squares allreduced along y (one scalar)."""
    if not tile.cost_only:
        sum_squares(tile.data("x"), tile.data("ss"))
    tile.charge(dt, p.dtype)
    await _allreduce(tile, p, "ss", "y")
    if not tile.cost_only:
        rms_scale(tile.data("x"), tile.data("ss"), weight, np.float32(p.dim), np.float32(p.eps), tile.data("h"))
    tile.charge(2 * dt, p.dtype)


@protocol(routes=_routes)
async def decode_step(tile, *, plan: dict, pos: int) -> None:
    """Run the token whose embedding is in ``x`` at position ``pos`` through this region's layers."""
    p = RegionPlan(**plan)
    full = not tile.cost_only
    h_rows, w_cols = tile.tiling.mesh.shape
    r = tile.rect
    G, nkv = p.groups, p.n_kv
    counts, starts = kv_rows(p.kv_mode, h_rows, pos + 1)
    cmax = int(counts.max())
    here = counts[tile.rows]  # tokens held by each row of the tile
    slots = (starts[tile.rows, None] + np.arange(cmax)) % p.cap  # (h, cmax): cache slot of each local row's tokens
    head, freq = _columns(p, r.x0, r.x1, w_cols)
    cos, sin = np.cos(pos * freq).astype(np.float32), np.sin(pos * freq).astype(np.float32)
    dt = tile.buffer("x").block[0]
    kvt = tile.buffer("qkv").block[1]
    ft = tile.buffer("ff").block[1]
    per_row = here[:, None] * np.ones(r.shape)  # attention work per core follows its row's tokens
    # attention's tasks, the same in every layer: their per-core cycles costed once
    score_cycles = tile.task_cycles(per_row * G * kvt, p.dtype, calls=G, maps=1)
    max_cycles = tile.task_cycles(per_row * G * nkv, p.dtype)
    exp_cycles = tile.task_cycles(2 * per_row * G * nkv, p.dtype)
    value_cycles = tile.task_cycles(per_row * G * (kvt + nkv), p.dtype, calls=G, maps=1)
    tile.alloc("scores", (nkv, G, cmax), p.dtype)
    shift = _kv_shift(tile, p, pos, h_rows)
    for layer in range(p.layers):
        # attention RMSNorm, then q, k, v in one fused GEMV reduced along y
        await _rmsnorm(tile, p, tile.data("attn_norm")[:, :, layer] if full else None, dt)
        tile.mark(f"{layer}:attn_norm")
        if full:
            w = tile.data("wqkv")[:, :, layer]
            block_vecmat(tile.data("h"), w, tile.data("qkv"))
        for heads in (G, 1, 1) if p.split else (G + 2,):
            tile.charge(dt * heads * kvt, p.dtype, calls=dt, maps=1)
        await _allreduce(tile, p, "qkv", "y")
        tile.mark(f"{layer}:qkv")
        if p.qkv_bias:
            if full:
                tile.data("qkv")[...] += tile.data("bqkv")[:, :, layer]
            tile.charge((G + 2) * kvt, p.dtype)
        if full:  # RoPE on q and k
            rope(tile.data("qkv"), G + 1, cos, sin)
        tile.charge(3 * (G + 1) * kvt, p.dtype)
        await _kv_append(tile, p, layer, pos, h_rows, shift)
        tile.mark(f"{layer}:rope_kv")
        # scores of each query head over the row's tokens, reduced along x
        if full:
            attention_scores(tile.data("qkv"), tile.data("k_cache")[:, :, layer], slots, here, head, tile.data("scores"))
        tile.charge_cycles(score_cycles)
        await _allreduce(tile, p, "scores", "x")
        tile.mark(f"{layer}:scores")
        # softmax over the whole sequence: max and sum allreduced along y
        if full:
            masked_max(tile.data("scores"), here, np.float32(np.sqrt(p.head_dim)), tile.data("att_m"))
        tile.charge_cycles(max_cycles)
        await _allreduce(tile, p, "att_m", "y", op="max")
        if full:
            exp_sum(tile.data("scores"), tile.data("att_m"), tile.data("att_s"))
        tile.charge_cycles(exp_cycles)
        await _allreduce(tile, p, "att_s", "y")
        tile.mark(f"{layer}:softmax")
        # o = softmax . V, reduced along y
        if full:
            attention_values(tile.data("scores"), tile.data("att_s"), tile.data("v_cache")[:, :, layer], slots, here, head,
                             tile.data("o"))
        tile.charge_cycles(value_cycles)
        await _allreduce(tile, p, "o", "y")
        tile.mark(f"{layer}:attn_values")
        # output projection reduced along x lands in x's layout; residual
        if full:
            block_vecmat(tile.data("o"), tile.data("wo")[:, :, layer], tile.data("y"))
        tile.charge(G * kvt * dt, p.dtype, calls=G * kvt, maps=1)
        await _allreduce(tile, p, "y", "x")
        if full:
            tile.data("x")[...] += tile.data("y")
        tile.mark(f"{layer}:attn_out")
        # FFN RMSNorm, gate and up in one GEMV reduced along y, SwiGLU
        await _rmsnorm(tile, p, tile.data("ffn_norm")[:, :, layer] if full else None, dt)
        tile.mark(f"{layer}:ffn_norm")
        if full:
            block_vecmat(tile.data("h"), tile.data("w13")[:, :, layer], tile.data("ff"))
        for parts in (1, 1) if p.split else (2,):
            tile.charge(dt * parts * ft, p.dtype, calls=dt, maps=1)
        await _allreduce(tile, p, "ff", "y")
        if full:
            swiglu(tile.data("ff"), tile.data("z"))
        tile.charge(3 * ft, p.dtype)
        tile.mark(f"{layer}:gate_up")
        # down projection reduced along x; residual
        if full:
            block_vecmat(tile.data("z"), tile.data("w2")[:, :, layer], tile.data("y"))
        tile.charge(ft * dt, p.dtype, calls=ft, maps=1)
        await _allreduce(tile, p, "y", "x")
        if full:
            tile.data("x")[...] += tile.data("y")
        tile.mark(f"{layer}:down")
    tile.free("scores")
    if p.head:  # final norm and LM head: logits reduced along y
        await _rmsnorm(tile, p, tile.data("final_norm") if full else None, dt)
        vt = tile.buffer("logits").block[0]
        if full:
            block_vecmat(tile.data("h"), tile.data("lm_head"), tile.data("logits"))
        tile.charge(dt * vt, p.dtype, calls=dt, maps=1)
        await _allreduce(tile, p, "logits", "y")
        tile.mark("head:lm_head")


def _kv_shift(tile, p: RegionPlan, pos: int, h_rows: int) -> tuple | None:
    """The shift of the KV cache before token ``pos`` is stored, the same in every layer (None: none): the row that
    receives without sending, the tile's rows that send with the cache slot of their oldest entry, and those that
    receive with the slot the entry lands in."""
    m = pos % h_rows  # before this token the bottom m rows hold one entry more than the others, ...
    if p.kv_mode != "shift" or h_rows == 1 or not m:
        return None
    first = h_rows - m - 1  # ... which pass their oldest entry north, so the tail row has room again
    oldest = kv_rows("shift", h_rows, pos)[1]
    send = np.flatnonzero(tile.rows > first)
    recv = np.flatnonzero((tile.rows >= first) & (tile.rows < h_rows - 1))
    return first, send, oldest[tile.rows[send]] % p.cap, recv, oldest[tile.rows[recv] + 1] % p.cap


async def _kv_append(tile, p: RegionPlan, layer: int, pos: int, h_rows: int, shift: tuple | None) -> None:
    """Store the new token's k and v (held by every row after the QKV allreduce) in the cache, after the cache's
    ``shift`` (``_kv_shift``)."""
    full = not tile.cost_only
    G = p.groups
    if shift is not None:
        first, send, send_slots, recv, recv_slots = shift
        if full:
            keys, values = tile.data("k_cache")[:, :, layer], tile.data("v_cache")[:, :, layer]
            kv_take(keys, values, send, send_slots, tile.data("kv_out"))
        await tile.exchange(_kv_shift_program(tile.tiling.mesh, first), "kv_out", into="kv_in")
        if full:
            kv_put(tile.data("kv_in"), recv, recv_slots, keys, values)
    if tile.rows[-1] == h_rows - 1 and full:  # the tail row takes the new entry
        qkv = tile.data("qkv")
        tile.data("k_cache")[-1, :, layer, pos % p.cap] = qkv[-1, :, G]
        tile.data("v_cache")[-1, :, layer, pos % p.cap] = qkv[-1, :, G + 1]
