"""Per-core compute kernels: one compiled loop over a tile's cores, each core's block product in a fixed order.

Every core computes only from its own block, in the same order whatever the tile's shape,
so results do not depend on how the mesh is split into tiles. Each weight byte is read
once per call.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


def block_vecmat(x: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """``out[y, x] = x[y, x] @ w[y, x]`` on every core: x ``[h, w, *K]``, w ``[h, w, *K, *N]``, out ``[h, w, *N]``.

    Each core's vector (the K axes flattened) times its matrix, summed over K in order.
    """
    cores, k = out.shape[0] * out.shape[1], x[0, 0].size
    flat = out.reshape(cores, -1)
    if not np.shares_memory(flat, out):
        raise ValueError("block_vecmat writes into out in place: give a contiguous array")
    _vecmat(x.reshape(cores, k), w.reshape(cores, k, -1), flat)


@njit(cache=True, parallel=True)
def _vecmat(x, w, out):
    for c in prange(out.shape[0]):
        for n in range(out.shape[1]):
            out[c, n] = x[c, 0] * w[c, 0, n]
        for d in range(1, x.shape[1]):
            xd = x[c, d]
            for n in range(out.shape[1]):
                out[c, n] += xd * w[c, d, n]
