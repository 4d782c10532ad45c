"""The per-core kernels against NumPy, core by core: those that copy a line's first result to cores with the same
inputs, and the GEMMs' block products."""

import numpy as np

from wafer_actors.kernels import block_attend, block_matmul, block_scores, exp_sum, swiglu


def test_swiglu_copies_only_to_cores_whose_gate_and_up_hold_the_same_bits():
    rng = np.random.default_rng(0)
    h, w, n = 5, 4, 7
    ff = np.broadcast_to(rng.standard_normal((1, w, 2, n), dtype=np.float32), (h, w, 2, n)).copy()  # rows alike
    ff[3, 1, 1, 2] += 1.0  # one core's up differs
    ff[0, 2, 0, 4] = 0.0
    ff[2, 2, 0, 4] = -0.0  # equal as floats, not as bits: silu(-0) * up is -0 * up
    ff[:, 3] = rng.standard_normal((h, 2, n), dtype=np.float32)  # a column whose rows all differ
    z = np.full((h, w, n), np.nan, dtype=np.float32)
    swiglu(ff, z)
    gate, up = ff[:, :, 0], ff[:, :, 1]
    want = gate / (np.float32(1) + np.exp(-gate)) * up
    np.testing.assert_allclose(z, want, rtol=2e-6, atol=0)
    assert np.array_equal(np.signbit(z), np.signbit(want))
    assert z[3, 1, 2] != z[0, 1, 2] and np.signbit(z[2, 2, 4]) != np.signbit(z[0, 2, 4])
    for y, x in np.ndindex(h, w):  # a copied result is bit for bit the core's own, computed alone
        alone = np.empty((1, 1, n), np.float32)
        swiglu(ff[y : y + 1, x : x + 1].copy(), alone)
        assert alone.tobytes() == z[y, x].tobytes(), (y, x)


def test_exp_sum_copies_only_to_cores_whose_scores_and_maxima_hold_the_same_bits():
    rng = np.random.default_rng(1)
    h, w, k, g, t = 3, 6, 2, 3, 4
    scores = np.broadcast_to(rng.standard_normal((h, 1, k, g, t), dtype=np.float32), (h, w, k, g, t)).copy()  # columns alike
    m = np.broadcast_to(scores.max(axis=(1, 4)), (w, h, k, g)).transpose(1, 0, 2, 3).copy()
    scores[1, 4, 0, 1, 3] -= 0.5  # one core's scores differ
    m[2, 5, 1, 2] += 0.25  # another core's maximum differs
    m[0, 3, 0, 0] += 0.25
    scores[0, 3, 0, 0] += 0.25  # a core whose every input differs
    before = scores.copy()
    total = np.full((h, w, k, g), np.nan, dtype=np.float32)
    exp_sum(scores, m, total)
    want = np.exp(before - m[..., None])
    np.testing.assert_allclose(scores, want, rtol=2e-6, atol=0)
    np.testing.assert_allclose(total, want.sum(axis=-1), rtol=1e-5, atol=0)
    assert scores[1, 4, 0, 1, 3] != scores[1, 0, 0, 1, 3] and total[2, 5, 1, 2] != total[2, 0, 1, 2]
    for y, x in np.ndindex(h, w):  # a copied result is bit for bit the core's own, computed alone
        alone, alone_total = before[y : y + 1, x : x + 1].copy(), np.empty((1, 1, k, g), np.float32)
        exp_sum(alone, m[y : y + 1, x : x + 1].copy(), alone_total)
        assert alone.tobytes() == scores[y, x].tobytes() and alone_total.tobytes() == total[y, x].tobytes(), (y, x)


def test_block_products_read_each_cores_blocks_through_its_index():
    """``block_matmul``, ``block_scores`` and ``block_attend`` against NumPy core by core, the operands read through
    permutations (where the fused GEMMs' ring shifts leave the blocks) or in place (index None). Integer-valued floats:
    every sum is exact, so any order of the additions gives the same bits."""
    rng = np.random.default_rng(2)
    h, w, s, G, T, nkv = 3, 4, 2, 3, 6, 2
    cores = h * w
    ints = lambda *shape: rng.integers(-4, 5, shape).astype(np.float32)  # noqa: E731
    i1, i2 = rng.permutation(cores), rng.permutation(cores)

    a, b, c0 = ints(h, w, s, 5), ints(h, w, 5, 7), ints(h, w, s, 7)
    for ia in (i1, None):
        c = c0.copy()
        block_matmul(a, ia, b, i2, c)
        af = a.reshape(cores, s, 5)[np.arange(cores) if ia is None else ia]
        want = c0.reshape(cores, s, 7) + np.einsum("qik,qkj->qij", af, b.reshape(cores, 5, 7)[i2])
        assert np.array_equal(c.reshape(cores, s, 7), want)

    head = rng.integers(-1, nkv, (w, T))  # each column's KV head of its K/V columns (-1: padding)
    onehot = (head[:, :, None] == np.arange(nkv)).astype(np.float32)  # (w, T, nkv)
    per_core = onehot[np.arange(cores) % w]  # (cores, T, nkv)
    q, k, c0 = ints(h, w, s, G + 2, T), ints(h, w, s, T), ints(h, w, s, G, nkv, s)
    c = c0.copy()
    block_scores(q, i1, k, i2, head, c)
    qf, kf = q.reshape(cores, s, G + 2, T)[i1, :, :G], k.reshape(cores, s, T)[i2]
    want = c0.reshape(cores, s, G, nkv, s) + np.einsum("pigt,pjt,ptn->pignj", qf, kf, per_core)
    assert np.array_equal(c.reshape(cores, s, G, nkv, s), want)

    pr, v, c0 = ints(h, w, s, G, nkv, s), ints(h, w, s, T), ints(h, w, s, G, T)
    c = c0.copy()
    block_attend(pr, i1, v, i2, head, c)
    pf, vf = pr.reshape(cores, s, G, nkv, s)[i1], v.reshape(cores, s, T)[i2]
    want = c0.reshape(cores, s, G, T) + np.einsum("pignj,pjt,ptn->pigt", pf, vf, per_core)
    assert np.array_equal(c.reshape(cores, s, G, T), want)
