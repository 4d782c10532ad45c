"""Prefill of a whole prompt on a P x P region (WaferLLM §4.1), and the hand-over to decode.

Prefill layout: the sequence (padded to S, a multiple of P) is split along y and every
other dimension along x, so core (py, px) holds ``st = S / P`` tokens. The weights stay
where decode put them (decode's layout already splits every matrix over both axes); they
are only skewed along y by ``relayout`` (MeshGEMM's host pre-skew, here done over the
fabric and undone at the hand-over). The residual stream ``xp`` is kept x-skewed (see
``wafer_actors.collectives.block_gemm``), so no GEMM ever aligns an operand:

    RMSNorm      xp (x-skewed)  sum of squares allreduced along x          -> hp (x-skewed)
    QKV          MeshGEMM hp . wqkv (D, G+2, KV)                           -> qkvp (natural), RoPE
    K, V         kept for the hand-over (``kv_p``), copies skewed along y   -> k_s, v_s
    scores       GEMM-T q . k_s^T per head (no transpose), causal mask      -> sc (x-skewed)
    softmax      max and sum allreduced along x
    P . V        MeshGEMM sc . v_s                                          -> op (natural)
    W_O          GEMM-T op . wo^T (wo is decode's (G, KV, D) split x, y)     -> yp (x-skewed), xp += yp
    FFN          RMSNorm, MeshGEMM hp . w13, SwiGLU, GEMM-T z . w2^T         -> xp += yp
    LM head      RMSNorm, MeshGEMM hp . lm_head                             -> logits_p (S, V) natural

The norm weights (decode: split along y, the same on every column) skewed along y hold
exactly the dims each core of x-skewed ``xp`` needs.

Hand-over: prefill leaves token t's K and V in ``kv_p`` on row t // st; decode's cache
wants them on the row ``kv_rows`` gives (shift: rows of n or n + 1 tokens; concat: the
tail row), slot t mod cap. ``kv_handover`` moves them south along the columns in rounds
in which no row sends or receives twice, then ``relayout`` un-skews the weights.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from wafer_actors.collectives.allreduce import allreduce_routes, run_allreduce
from wafer_actors.collectives.block_gemm import block_gemm_routes, gemm_t_skewed, mesh_gemm_skewed, skew, skew_index
from wafer_actors.errors import InvalidArgument
from wafer_actors.kernels import block_attend, block_matmul, block_scores
from wafer_actors.mesh import Mesh
from wafer_actors.protocol import protocol
from wafer_actors.transfer import Route, Transfer

from .decode_protocol import RegionPlan, _columns, _rope, kv_rows

LAYER_WEIGHTS = ("attn_norm", "wqkv", "wo", "ffn_norm", "w13", "w2")


def _routes(mesh: Mesh, *, plan: dict, tokens: int, layer: int) -> list[Route]:
    return block_gemm_routes(mesh) + allreduce_routes(mesh, axis="x", algo=plan["algo"], K=plan["K"], group_num=plan["group_num"])


async def _allreduce_x(tile, p: RegionPlan, buffer: str, op: str = "add") -> None:
    await run_allreduce(tile, buffer=buffer, axis="x", op=op, algo=p.algo, K=p.K, group_num=p.group_num)


async def _rmsnorm(tile, p: RegionPlan, weight: np.ndarray | None, st: int, dt: int) -> None:
    """hp = xp / rms(xp) * weight per token, the sums of squares allreduced along x."""
    if not tile.cost_only:
        x = tile.data("xp")
        tile.data("ssp")[...] = np.einsum("yxid,yxid->yxi", x, x)
    tile.charge(st * dt, p.dtype)
    await _allreduce_x(tile, p, "ssp")
    if not tile.cost_only:
        scale = 1.0 / np.sqrt(tile.data("ssp") / np.float32(p.dim) + np.float32(p.eps))
        tile.data("hp")[...] = tile.data("xp") * scale[..., None] * weight[:, :, None, :]
    tile.charge(2 * st * dt, p.dtype)


async def _projection(tile, p: RegionPlan, a: str, b: str, c: str, parts: tuple[int, ...], fmacs: int, dt: int) -> None:
    """c = a . b for a projection whose outputs stack along axis 1 of b and c (q, k, v; gate, up): one
    MeshGEMM, or with ``p.split`` (the paper kernel) one per part, as the authors' CSL runs them.
    ``fmacs``: one step's FMACs per unit of axis 1."""
    st = tile.buffer(a).block[0]
    if not p.split:
        n = sum(parts)
        await mesh_gemm_skewed(tile, a=a, b=b, c=c, product=block_matmul, fmacs=fmacs * n, calls=fmacs * n // st, maps=dt)
        return
    lo = 0
    for n in parts:
        part = (slice(None), slice(lo, lo + n))
        tile.alias(f"{b}:part", b, part)
        tile.alias(f"{c}:part", c, part)
        await mesh_gemm_skewed(tile, a=a, b=f"{b}:part", c=f"{c}:part", product=block_matmul, fmacs=fmacs * n,
                               calls=fmacs * n // st, maps=dt)
        tile.free(f"{b}:part")
        tile.free(f"{c}:part")
        lo += n


@protocol(routes=_routes)
async def prefill(tile, *, plan: dict, tokens: int, layer: int) -> None:
    """Run the ``tokens`` prompt tokens in ``xp`` (x-skewed) through the region's layer ``layer`` (weights y-skewed),
    or, with ``layer`` = the region's layer count, through the final norm and LM head.

    The driver runs the layers one by one (to show progress); the clocks run on between them.
    """
    p = RegionPlan(**plan)
    full = not tile.cost_only
    mesh, r = tile.tiling.mesh, tile.rect
    P = mesh.height
    G, nkv = p.groups, p.n_kv
    st, dt = tile.buffer("xp").block
    kvt, ft = tile.buffer("wqkv").block[-1], tile.buffer("w13").block[-1]
    qpos = tile.rows[:, None] * st + np.arange(st)  # (h, st): positions of each row's queries
    kpos = tile.local(skew_index(P))[:, :, None] * st + np.arange(st)  # keys of each core's x-skewed scores
    allowed = (kpos[:, :, None, :] <= qpos[:, None, :, None]) & (kpos[:, :, None, :] < tokens)  # (h, w, st_q, st_k)
    head, freq = _columns(p, r.x0, r.x1, P)  # (w, kvt), (w, kvt / 2)
    angle = qpos[:, None, :, None, None] * freq[None, :, None, None, :]  # (h, w, st, 1, kvt / 2)
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
    work = {"hp": (st, dt), "ssp": (st,), "qkvp": (st, G + 2, kvt), "k_s": (st, kvt), "v_s": (st, kvt),
            "sc": (st, G, nkv, st), "att_mp": (st, G, nkv), "att_sp": (st, G, nkv), "op": (st, G, kvt),
            "yp": (st, dt), "ffp": (st, 2, ft), "zp": (st, ft)}
    for name, block in work.items():
        tile.alloc(name, block, p.dtype)
    per_step = st * st  # query x key pairs of one block

    def cost(fmacs: int, k: int) -> dict:  # Mt = st: st-long vector instructions, one loop per contraction row k
        return {"fmacs": fmacs, "calls": fmacs // st, "maps": k}

    def scores(q, iq, k, ik, c):  # per KV head: the query rows against that head's key columns
        block_scores(q, iq, k, ik, head, c)

    def attend(pr, ipr, v, iv, c):
        block_attend(pr, ipr, v, iv, head, c)

    if not 0 <= layer <= p.layers or (layer == p.layers and not p.head):
        raise InvalidArgument(f"prefill: layer must be in [0, {p.layers}{']' if p.head else ')'} on this region, got {layer}")
    if layer < p.layers:
        weights = {n: f"{n}@" for n in LAYER_WEIGHTS}
        for n, alias in weights.items():
            tile.alias(alias, n, (layer,))
        await _rmsnorm(tile, p, tile.data(weights["attn_norm"]) if full else None, st, dt)
        tile.mark("attn_norm")
        await _projection(tile, p, "hp", weights["wqkv"], "qkvp", (G, 1, 1), st * dt * kvt, dt)
        tile.mark("qkv")
        if p.qkv_bias:  # on every row (not skewed): each core's columns
            if full:
                tile.data("qkvp")[...] += tile.data("bqkv")[:, :, None, layer]
            tile.charge(st * (G + 2) * kvt, p.dtype)
        if full:
            qkv = tile.data("qkvp")
            _rope(qkv[:, :, :, : G + 1], cos, sin)
            tile.data("kv_p")[:, :, :, layer] = qkv[:, :, :, G:]  # natural layout, kept for the hand-over
            tile.data("k_s")[...] = qkv[:, :, :, G]
            tile.data("v_s")[...] = qkv[:, :, :, G + 1]
        tile.charge(3 * st * (G + 1) * kvt, p.dtype)
        await skew(tile, ["k_s", "v_s"], axis="y")
        tile.mark("rope_kv")
        await gemm_t_skewed(tile, a="qkvp", b="k_s", c="sc", product=scores, **cost(per_step * G * kvt, G * kvt))
        tile.mark("scores")
        if full:  # causal softmax over the row's keys, max and sum allreduced along x
            sc = tile.data("sc")
            sc /= np.float32(np.sqrt(p.head_dim))
            sc[...] = np.where(allowed[:, :, :, None, None, :], sc, -np.inf)
            tile.data("att_mp")[...] = sc.max(axis=-1)
        tile.charge(per_step * G * nkv, p.dtype)
        await _allreduce_x(tile, p, "att_mp", op="max")
        if full:
            sc = tile.data("sc")
            sc[...] = np.exp(sc - tile.data("att_mp")[..., None])
            tile.data("att_sp")[...] = sc.sum(axis=-1)
        tile.charge(2 * per_step * G * nkv, p.dtype)
        await _allreduce_x(tile, p, "att_sp")
        if full:
            tile.data("sc")[...] /= tile.data("att_sp")[..., None]
        tile.charge(per_step * G * nkv, p.dtype)
        tile.mark("softmax")
        await mesh_gemm_skewed(tile, a="sc", b="v_s", c="op", product=attend, **cost(per_step * G * kvt, G * st))
        tile.mark("attn_values")
        await gemm_t_skewed(tile, a="op", b=weights["wo"], c="yp",
                            product=block_matmul,
                            **cost(st * G * kvt * dt, G * kvt))
        if full:
            tile.data("xp")[...] += tile.data("yp")
        tile.charge(st * dt, p.dtype)
        tile.mark("attn_out")
        await _rmsnorm(tile, p, tile.data(weights["ffn_norm"]) if full else None, st, dt)
        tile.mark("ffn_norm")
        await _projection(tile, p, "hp", weights["w13"], "ffp", (1, 1), st * dt * ft, dt)
        if full:
            ff = tile.data("ffp")
            gate, up = ff[:, :, :, 0], ff[:, :, :, 1]
            tile.data("zp")[...] = gate / (1 + np.exp(-gate)) * up
        tile.charge(3 * st * ft, p.dtype)
        tile.mark("gate_up")
        await gemm_t_skewed(tile, a="zp", b=weights["w2"], c="yp",
                            product=block_matmul,
                            **cost(st * ft * dt, ft))
        if full:
            tile.data("xp")[...] += tile.data("yp")
        tile.charge(st * dt, p.dtype)
        tile.mark("down")
        for alias in weights.values():
            tile.free(alias)
    else:  # the vocabulary in column chunks, so the LM head's second buffer is no larger than the FFN's
        await _rmsnorm(tile, p, tile.data("final_norm") if full else None, st, dt)
        tile.mark("final_norm")
        for c0, c1 in head_chunks(dt, tile.buffer("lm_head").block[1], 2 * ft):
            tile.alias("lm_head@", "lm_head", (slice(None), slice(c0, c1)))
            tile.alias("logits@", "logits_p", (slice(None), slice(c0, c1)))
            await mesh_gemm_skewed(tile, a="hp", b="lm_head@", c="logits@", product=block_matmul, **cost(st * dt * (c1 - c0), dt))
            tile.free("lm_head@")
            tile.free("logits@")
        tile.mark("lm_head")
    for name in work:
        tile.free(name)


def _relayout_routes(mesh: Mesh, *, layers: int, head: bool, to: str) -> list[Route]:
    return block_gemm_routes(mesh)


@protocol(routes=_relayout_routes)
async def relayout(tile, *, layers: int, head: bool, to: str) -> None:
    """Skew the weights along y for prefill (``to="prefill"``) or undo it for decode (``to="decode"``), layer by layer."""
    if to not in ("prefill", "decode"):
        raise InvalidArgument(f"relayout: to must be 'prefill' or 'decode', got {to!r}")
    for layer in range(layers):
        names = []
        for n in LAYER_WEIGHTS:
            tile.alias(f"{n}@", n, (layer,))
            names.append(f"{n}@")
        await skew(tile, names, axis="y", reverse=to == "decode")
        for n in names:
            tile.free(n)
    if head:
        await skew(tile, ["final_norm"], axis="y", reverse=to == "decode")
        for c0, c1 in head_chunks(*tile.buffer("lm_head").block, 2 * tile.buffer("w13").block[-1]):
            tile.alias("lm_head@", "lm_head", (slice(None), slice(c0, c1)))
            await skew(tile, ["lm_head@"], axis="y", reverse=to == "decode")
            tile.free("lm_head@")


def head_chunks(dt: int, vt: int, cols: int) -> list[tuple[int, int]]:
    """Column ranges of a core's (dt, vt) LM head block, each at most ``cols`` wide (at least one range)."""
    n = -(-vt // max(cols, 1))
    bounds = [vt * i // n for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


@lru_cache(maxsize=64)
def handover_rounds(height: int, st: int, tokens: int, mode: str, cap: int) -> tuple[np.ndarray, ...]:
    """Rounds of the KV hand-over: per round an int array of (src_row, src_slot, dst_row, dst_slot) rows.

    Token t sits in row t // st, slot t mod st after prefill and must go to the row that
    ``kv_rows(mode, height, tokens)`` gives, slot t mod cap. Greedy: each token takes the
    first round in which neither its source nor its destination row is busy (shift: one
    round per prefill slot; concat: one round per token, all going to the tail row).
    """
    counts, starts = kv_rows(mode, height, tokens)
    dst_row = np.repeat(np.arange(height), counts)
    busy_src: list[set] = []
    busy_dst: list[set] = []
    rounds: list[list] = []
    order = sorted(range(tokens), key=lambda t: (t % st, t // st))
    for t in order:
        src, dst = t // st, int(dst_row[t])
        k = 0
        while k < len(rounds) and (src in busy_src[k] or dst in busy_dst[k]):
            k += 1
        if k == len(rounds):
            rounds.append([]), busy_src.append(set()), busy_dst.append(set())
        rounds[k].append((src, t % st, dst, t % cap))
        busy_src[k].add(src)
        busy_dst[k].add(dst)
    return tuple(np.array(rd, dtype=np.int64).reshape(-1, 4) for rd in rounds)


@lru_cache(maxsize=16)
def handover_plan(mesh: Mesh, st: int, tokens: int, mode: str, cap: int) -> tuple[tuple[np.ndarray, Transfer | None], ...]:
    """Per round: the moves and the transfer of those that leave their row (every column at once), or None."""
    plan = []
    for i, moves in enumerate(handover_rounds(mesh.height, st, tokens, mode, cap)):
        far = moves[moves[:, 0] != moves[:, 2]]
        t = None if not len(far) else Transfer.along(mesh, "y", f"kv_handover:{i}", "kv_handover", far[:, 0], far[:, 2])
        plan.append((moves, t))
    return tuple(plan)


def _handover_routes(mesh: Mesh, *, st: int, tokens: int, mode: str, cap: int) -> list[Route]:
    ts = tuple(t for _, t in handover_plan(mesh, st, tokens, mode, cap) if t is not None)
    return [Route("kv_handover", ts)] if ts else []


@protocol(routes=_handover_routes)
async def kv_handover(tile, *, st: int, tokens: int, mode: str, cap: int) -> None:
    """Move the prompt's K and V from ``kv_p`` (prefill rows) into ``k_cache``/``v_cache`` (decode rows)."""
    full = not tile.cost_only
    kv_p = tile.buffer("kv_p")  # block (st, L, 2, kvt)
    tile.alloc("kv_send", kv_p.block[1:], kv_p.dtype.str)
    tile.alloc("kv_recv", kv_p.block[1:], kv_p.dtype.str)
    for moves, t in handover_plan(tile.tiling.mesh, st, tokens, mode, cap):
        src, sslot, dst, dslot = moves.T
        leaves = src != dst
        ls, ld = tile.local_rows(src), tile.local_rows(dst)
        if full:
            stay = (ls >= 0) & ~leaves
            _store(tile, tile.data("kv_p")[ls[stay], :, sslot[stay]], ld[stay], dslot[stay])
            out = (ls >= 0) & leaves
            tile.data("kv_send")[ls[out]] = tile.data("kv_p")[ls[out], :, sslot[out]]
        if t is None:
            continue
        tile.send(t, "kv_send")
        await tile.recv(t, "kv_recv")
        if full:
            into = (ld >= 0) & leaves
            _store(tile, tile.data("kv_recv")[ld[into]], ld[into], dslot[into])
    tile.free("kv_send")
    tile.free("kv_recv")


def _store(tile, kv: np.ndarray, rows: np.ndarray, slots: np.ndarray) -> None:
    """Write K and V entries ``kv`` (n, w, L, 2, kvt) into the cache slots ``slots`` of the local ``rows``."""
    tile.data("k_cache")[rows, :, :, slots] = kv[..., 0, :]
    tile.data("v_cache")[rows, :, :, slots] = kv[..., 1, :]
