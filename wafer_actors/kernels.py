"""Per-core compute kernels: one compiled loop over a tile's cores, each core's block product in a fixed order.

Every core computes only from its own block, in the same order whatever the tile's shape,
so results do not depend on how the mesh is split into tiles. Each weight byte is read
once per call.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .compiled import compiled


def _flat(a: np.ndarray, index: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``a`` with its two core axes as one, and the core each core reads (None: its own)."""
    cores = a.shape[0] * a.shape[1]
    return a.reshape(cores, *a.shape[2:]), np.arange(cores) if index is None else index


def _into(c: np.ndarray, *block: int) -> np.ndarray:
    """``c`` as ``[cores, *block]`` (default: its block axes); refused unless a view, as the kernels write into it."""
    flat = c.reshape(c.shape[0] * c.shape[1], *(block or c.shape[2:]))
    if not np.shares_memory(flat, c):
        raise ValueError("the kernel adds into its output in place: give a contiguous array")
    return flat


def _flat_blocks(a: np.ndarray) -> np.ndarray:
    """``a`` as ``[h, w, elements]`` (a view, as ``_into``)."""
    return _into(a, -1).reshape(a.shape[0], a.shape[1], -1)


def block_vecmat(x: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """``out[y, x] = x[y, x] @ w[y, x]`` on every core: x ``[h, w, *K]``, w ``[h, w, *K, *N]``, out ``[h, w, *N]``.

    Each core's vector (the K axes flattened) times its matrix, summed over K in order.
    """
    cores, k = out.shape[0] * out.shape[1], x[0, 0].size
    _vecmat(x.reshape(cores, k), w.reshape(cores, k, -1), _into(out, -1))


@compiled(parallel=True)
def _vecmat(x, w, out):
    for c in prange(out.shape[0]):
        for n in range(out.shape[1]):
            out[c, n] = x[c, 0] * w[c, 0, n]
        for d in range(1, x.shape[1]):
            xd = x[c, d]
            for n in range(out.shape[1]):
                out[c, n] += xd * w[c, d, n]


# ---- the decode step's per-core vector work: float32 blocks ``[h, w, ...]``, one core at a time ----
@compiled(parallel=True)
def sum_squares(x, out):
    """``out[y, x, 0] = sum(x[y, x] ** 2)``, in element order."""
    for y in prange(x.shape[0]):
        for c in range(x.shape[1]):
            s = np.float32(0.0)
            for d in range(x.shape[2]):
                s += x[y, c, d] * x[y, c, d]
            out[y, c, 0] = s


@compiled(parallel=True)
def rms_scale(x, ss, weight, dim, eps, out):
    """``out = x / sqrt(ss / dim + eps) * weight``: RMSNorm from the allreduced sum of squares ``ss[y, x, 0]``."""
    for y in prange(x.shape[0]):
        for c in range(x.shape[1]):
            scale = np.float32(1.0) / np.sqrt(ss[y, c, 0] / dim + eps)
            for d in range(x.shape[2]):
                out[y, c, d] = x[y, c, d] * scale * weight[y, c, d]


@compiled(parallel=True)
def rope(t, vectors, cos, sin):
    """Rotate adjacent pairs of the first ``vectors`` vectors of every core's ``t[y, x]`` in place (angles per column)."""
    for y in prange(t.shape[0]):
        for c in range(t.shape[1]):
            for v in range(vectors):
                for i in range(t.shape[3] // 2):
                    even, odd = t[y, c, v, 2 * i], t[y, c, v, 2 * i + 1]
                    t[y, c, v, 2 * i] = even * cos[c, i] - odd * sin[c, i]
                    t[y, c, v, 2 * i + 1] = even * sin[c, i] + odd * cos[c, i]


# After an allreduce with its broadcast every core of a line holds the same block. The kernels below compute a
# line's first core and copy its result to each core whose inputs hold the same bits (so the same result); any other
# core is computed on its own.
def _bits(a: np.ndarray) -> np.ndarray:
    """The cores' blocks of ``a`` as unsigned integers of its item size, ``[h, w, elements]`` (a view)."""
    return a.reshape(a.shape[0], a.shape[1], -1).view(f"u{a.itemsize}")


@njit(inline="always")
def _same(a, ya, xa, b, yb, xb):
    """Whether block ``a[ya, xa]`` holds the bits of ``b[yb, xb]`` (both ``_bits`` views)."""
    ra, rb, d = a[ya, xa], b[yb, xb], 0
    for e in range(ra.size):  # no early exit: a loop the compiler vectorises
        d |= ra[e] ^ rb[e]
    return d == 0


@njit(inline="always")
def _copy(a, y, x, y0, x0):
    """Block ``a[y, x] = a[y0, x0]`` (``a`` as ``[h, w, elements]``)."""
    out, src = a[y, x], a[y0, x0]
    for e in range(out.size):
        out[e] = src[e]


def swiglu(ff: np.ndarray, z: np.ndarray) -> None:
    """``z = silu(gate) * up`` with ``ff[y, x] = (gate, up)``."""
    _swiglu(ff, z, _bits(ff))


@compiled(parallel=True)
def _swiglu(ff, z, bits):
    for c in prange(ff.shape[1]):
        _swiglu_core(ff, z, 0, c)
    for y in prange(1, ff.shape[0]):
        for c in range(ff.shape[1]):
            if _same(bits, y, c, bits, 0, c):
                _copy(z, y, c, 0, c)
            else:
                _swiglu_core(ff, z, y, c)


@njit(inline="always")
def _swiglu_core(ff, z, y, c):
    for i in range(z.shape[2]):
        g = ff[y, c, 0, i]
        z[y, c, i] = g / (np.float32(1.0) + np.exp(-g)) * ff[y, c, 1, i]


@compiled(parallel=True)
def attention_scores(q, cache, slots, held, head, scores):
    """Each core's partial scores of each query head over its row's tokens.

    ``scores[y, x, k, g, i] = sum_j q[y, x, g, j] * key[j]`` over the columns j of KV head
    k (``head[x, j]``, -1 for padding), where key is the token in slot ``slots[y, i]`` of
    ``cache[y, x]`` (``[cap, n]``); row y holds ``held[y]`` tokens, the rest score 0.
    """
    for y in prange(q.shape[0]):
        for c in range(q.shape[1]):
            scores[y, c] = 0.0
            for i in range(held[y]):
                s = slots[y, i]
                for j in range(cache.shape[3]):
                    k = head[c, j]
                    if k < 0:
                        continue
                    key = cache[y, c, s, j]
                    for g in range(scores.shape[3]):
                        scores[y, c, k, g, i] += q[y, c, g, j] * key


@compiled
def kv_take(keys, values, rows, slots, out):
    """``out[y, x] = (key, value)`` of slot ``slots[i]`` of the caches (a layer's, ``[h, w, cap, n]``), for each row
    y = ``rows[i]`` (``out`` ``[h, w, 2, n]``)."""
    for i in range(rows.size):
        y, s = rows[i], slots[i]
        for c in range(out.shape[1]):
            for j in range(out.shape[3]):
                out[y, c, 0, j] = keys[y, c, s, j]
                out[y, c, 1, j] = values[y, c, s, j]


@compiled
def kv_put(kv, rows, slots, keys, values):
    """The reverse of ``kv_take``: slot ``slots[i]`` of the caches takes ``kv[y, x]`` (key, value), for each row
    y = ``rows[i]``."""
    for i in range(rows.size):
        y, s = rows[i], slots[i]
        for c in range(kv.shape[1]):
            for j in range(kv.shape[3]):
                keys[y, c, s, j] = kv[y, c, 0, j]
                values[y, c, s, j] = kv[y, c, 1, j]


@compiled(parallel=True)
def masked_max(scores, held, scale, out):
    """Divide the scores by ``scale``, set those of tokens the row does not hold to -inf, take each head's maximum."""
    for y in prange(scores.shape[0]):
        for c in range(scores.shape[1]):
            for k in range(scores.shape[2]):
                for g in range(scores.shape[3]):
                    m = -np.inf
                    for i in range(scores.shape[4]):
                        v = scores[y, c, k, g, i] / scale if i < held[y] else -np.inf
                        scores[y, c, k, g, i] = v
                        m = max(m, v)
                    out[y, c, k, g] = m


def exp_sum(scores: np.ndarray, m: np.ndarray, out: np.ndarray) -> None:
    """``scores = exp(scores - m)`` per head, and each head's sum."""
    _exp_sum(scores, m, out, _bits(scores), _bits(scores[:, :1].copy()), _bits(m), _flat_blocks(scores),
             _flat_blocks(out))


@compiled(parallel=True)
def _exp_sum(scores, m, out, bits, first, m_bits, flat, flat_out):
    for y in prange(scores.shape[0]):
        _exp_sum_core(scores, m, out, y, 0)
        for c in range(1, scores.shape[1]):
            if _same(bits, y, c, first, y, 0) and _same(m_bits, y, c, m_bits, y, 0):
                _copy(flat, y, c, y, 0)
                _copy(flat_out, y, c, y, 0)
            else:
                _exp_sum_core(scores, m, out, y, c)


@njit(inline="always")
def _exp_sum_core(scores, m, out, y, c):
    for k in range(scores.shape[2]):
        for g in range(scores.shape[3]):
            s = np.float32(0.0)
            for i in range(scores.shape[4]):
                v = np.exp(scores[y, c, k, g, i] - m[y, c, k, g])
                scores[y, c, k, g, i] = v
                s += v
            out[y, c, k, g] = s


@compiled(parallel=True)
def attention_values(scores, total, cache, slots, held, head, o):
    """``o[y, x, g, j] = sum_i scores[y, x, k, g, i] / total[y, x, k, g] * value_i[j]``, k = head[x, j], over the row's tokens."""
    for y in prange(scores.shape[0]):
        for c in range(scores.shape[1]):
            for k in range(scores.shape[2]):
                for g in range(scores.shape[3]):
                    for i in range(held[y]):
                        scores[y, c, k, g, i] /= total[y, c, k, g]
            o[y, c] = 0.0
            for i in range(held[y]):
                s = slots[y, i]
                for j in range(cache.shape[3]):
                    k = head[c, j]
                    if k < 0:
                        continue
                    v = cache[y, c, s, j]
                    for g in range(o.shape[2]):
                        o[y, c, g, j] += scores[y, c, k, g, i] * v


def block_matmul(a: np.ndarray, ia: np.ndarray | None, b: np.ndarray, ib: np.ndarray | None, c: np.ndarray) -> None:
    """``c[core] += a[ia[core]] @ b[ib[core]]`` on every core (an index None: each core its own block).

    ``a`` ``[h, w, m, *K]``, ``b`` ``[h, w, *K, *N]``, ``c`` ``[h, w, m, *N]``; the K axes
    are contracted in order, element by element into ``c``. The indices let an operand
    whose blocks moved only by index (the fused executor's ring shifts) be read in place.
    """
    cores, m, k = c.shape[0] * c.shape[1], c.shape[2], a[0, 0, 0].size
    (af, ia), (bf, ib) = _flat(a, ia), _flat(b, ib)
    _matmul(af.reshape(cores, m, k), ia, bf.reshape(cores, k, -1), ib, _into(c, m, -1))


@compiled(parallel=True)
def _matmul(a, ia, b, ib, c):  # indexed element by element: a view of each core's block per core cost 1.6-2.4x
    for q in prange(c.shape[0]):
        p, r = ia[q], ib[q]
        for i in range(c.shape[1]):
            for k in range(a.shape[2]):
                v = a[p, i, k]
                for j in range(c.shape[2]):
                    c[q, i, j] += v * b[r, k, j]


def block_scores(q: np.ndarray, iq: np.ndarray | None, k: np.ndarray, ik: np.ndarray | None, head: np.ndarray,
                 c: np.ndarray) -> None:
    """Attention scores per KV head: ``c[i, g, n, j] += sum_t q[i, g, t] k[j, t]`` over the columns t of head n.

    ``q`` ``[h, w, s, >= G, T]`` (the first G vectors), ``k`` ``[h, w, s, T]``, ``c``
    ``[h, w, s, G, nkv, s]``; ``head[x, t]`` is the KV head of column t on local column x
    (-1: padding); indices as in ``block_matmul``.
    """
    (qf, iq), (kf, ik) = _flat(q, iq), _flat(k, ik)
    _scores(qf, iq, kf, ik, head, c.shape[1], _into(c))


@compiled(parallel=True)
def _scores(q, iq, k, ik, head, width, c):
    for p in prange(c.shape[0]):  # indexed element by element, as ``_matmul``
        x, pq, pk = p % width, iq[p], ik[p]
        for i in range(c.shape[1]):
            for g in range(c.shape[2]):
                for t in range(k.shape[2]):
                    n = head[x, t]
                    if n < 0:
                        continue
                    v = q[pq, i, g, t]
                    for j in range(c.shape[4]):
                        c[p, i, g, n, j] += v * k[pk, j, t]


def block_attend(pr: np.ndarray, ipr: np.ndarray | None, v: np.ndarray, iv: np.ndarray | None, head: np.ndarray,
                 c: np.ndarray) -> None:
    """Attention output: ``c[i, g, t] += sum_j pr[i, g, n, j] v[j, t]`` with n the KV head of column t.

    ``pr`` ``[h, w, s, G, nkv, s]``, ``v`` ``[h, w, s, T]``, ``c`` ``[h, w, s, G, T]``.
    """
    (pf, ipr), (vf, iv) = _flat(pr, ipr), _flat(v, iv)
    _attend(pf, ipr, vf, iv, head, c.shape[1], _into(c))


@compiled(parallel=True)
def _attend(pr, ipr, v, iv, head, width, c):
    for p in prange(c.shape[0]):  # indexed element by element, as ``_matmul``
        x, pp, pv = p % width, ipr[p], iv[p]
        for i in range(c.shape[1]):
            for g in range(c.shape[2]):
                for t in range(c.shape[3]):
                    n = head[x, t]
                    if n < 0:
                        continue
                    for j in range(v.shape[1]):
                        c[p, i, g, t] += pr[pp, i, g, n, j] * v[pv, j, t]
