"""INTERLEAVE (WaferLLM Algorithm 1): a ring over a line of cores with every link at most two hops.

Even positions step two places up the line, odd positions two places down, with one-hop
links at the two ends: for n = 5 the ring is 0 -> 2 -> 4 -> 3 -> 1 -> 0, for even n it is
0 -> 2 -> ... -> n-2 -> n-1 -> n-3 -> ... -> 3 -> 1 -> 0 (a folded torus laid on a line).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def interleave(index: int, n: int) -> tuple[int, int]:
    """Return (send_to, receive_from) of core ``index`` on a line of ``n`` cores (n >= 2)."""
    if index % 2 == 0:
        recv, send = max(index - 2, 0), min(index + 2, n - 1)
    else:
        recv, send = min(index + 2, n - 1), max(index - 2, 0)
    if index == 0:
        recv = 1
    if index == n - 1:
        if n % 2 == 0:
            recv = n - 2
        else:
            send = n - 2
    return send, recv


@lru_cache(maxsize=64)
def ring_order(n: int) -> np.ndarray:
    """Physical positions in ring order, starting at 0: ``ring[l]`` is the core at ring place l."""
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    order = [0]
    for _ in range(n - 1):
        order.append(interleave(order[-1], n)[0])
    ring = np.array(order, dtype=np.int64)
    if sorted(order) != list(range(n)):
        raise AssertionError(f"INTERLEAVE did not close a ring over {n} cores: {order}")
    return ring


def places(ring: np.ndarray) -> np.ndarray:
    """Inverse of a ring order: ``places(ring)[p]`` is the ring place of physical core p."""
    place = np.empty(len(ring), dtype=np.int64)
    place[ring] = np.arange(len(ring))
    return place
