"""Host-side helpers: load operands, run one protocol, read the result back.

The protocols need every split tensor axis to be a multiple of the mesh side it is split
over. These helpers zero-pad the operands to the next multiple (zeros add nothing to a
product) and cut the result back, so any shape works. In a cost-only wafer, pass
``TensorShape`` instead of arrays: nothing is materialised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidArgument
from .layout import Spec
from .wafer import RunStats, Wafer


@dataclass(frozen=True)
class TensorShape:
    """A tensor's shape and dtype without its values (for cost-only runs)."""

    shape: tuple[int, ...]
    dtype: str = "float32"


def _up(n: int, m: int) -> int:
    return -(-n // m) * m


def _place(wafer: Wafer, name: str, t: np.ndarray | TensorShape, padded: tuple[int, ...], spec: Spec) -> None:
    """Load ``t`` zero-padded to ``padded`` (or allocate its shape on a cost-only wafer)."""
    if isinstance(t, TensorShape) or wafer.cost_only:
        dtype = t.dtype if isinstance(t, TensorShape) else t.dtype
        wafer.alloc(name, padded, dtype, spec)
        return
    a = np.asarray(t)
    if a.shape != padded:
        a = np.pad(a, [(0, p - s) for s, p in zip(a.shape, padded)])
    wafer.load(name, a, spec)


def _shape(t: np.ndarray | TensorShape) -> tuple[int, ...]:
    return tuple(t.shape)


def gemv(wafer: Wafer, x: np.ndarray | TensorShape, w: np.ndarray | TensorShape, *, axis: str = "y", **options: Any) -> tuple[np.ndarray | None, RunStats]:
    """Compute ``x . w`` with MeshGEMV; return (result or None when cost-only, statistics).

    The core clocks are reset first, so the statistics time this GEMV alone.

    Args:
        axis: mesh axis the reduction runs along (x's split axis).
        options: ``algo``, ``K``, ``group_num``, ``broadcast`` of ``mesh_gemv``.

    Raises:
        ValueError: x and w do not chain (x must be (M,), w (M, N)).
    """
    from .collectives.mesh_gemv import mesh_gemv

    (m,), (m2, n) = _shape(x), _shape(w)
    if m != m2:
        raise InvalidArgument(f"gemv: x has {m} elements but w has {m2} rows; expected x (M,) and w (M, N)")
    other = "x" if axis == "y" else "y"
    mp, np_ = _up(m, wafer.mesh.axis_size(axis)), _up(n, wafer.mesh.axis_size(other))
    _place(wafer, "_gemv_x", x, (mp,), Spec(axis))
    _place(wafer, "_gemv_w", w, (mp, np_), Spec(axis, other))
    dtype = w.dtype if isinstance(w, TensorShape) else np.asarray(w).dtype
    wafer.alloc("_gemv_y", (np_,), dtype, Spec(other))
    wafer.reset_clocks()  # time the GEMV alone, from a common start
    try:
        stats = wafer.run(mesh_gemv, x="_gemv_x", w="_gemv_w", out="_gemv_y", axis=axis, **options)
        y = None if wafer.cost_only else wafer.read("_gemv_y")[:n]
    finally:
        for name in ("_gemv_x", "_gemv_w", "_gemv_y"):
            wafer.free(name)
    return y, stats


def gemm(wafer: Wafer, a: np.ndarray | TensorShape, b: np.ndarray | TensorShape, *, algo: str = "meshgemm",
         transpose_b: bool = False, **options: Any) -> tuple[np.ndarray | None, RunStats]:
    """Compute ``a . b`` with MeshGEMM (or ``cannon`` / ``summa``); return (result, statistics).

    With ``transpose_b`` compute ``a . b^T`` with GEMM-T instead (b is (N, K), never
    transposed; square meshes only). On a non-square mesh M, K and N are padded to
    multiples of lcm(height, width) and B's row blocks are loaded in the order the rings
    need (as WaferLLM's host pre-arranges B). The core clocks are reset first, so the
    statistics time this GEMM alone.

    Raises:
        ValueError: the shapes do not chain, or GEMM-T on a mesh that is not square.
    """
    from .collectives.gemm_t import gemm_t
    from .collectives.mesh_gemm import b_row_order, mesh_gemm

    (m, k), (k2, n) = _shape(a), _shape(b)[::-1] if transpose_b else _shape(b)
    if k != k2:
        raise InvalidArgument(f"gemm: a is {m}x{k} but b{'^T' if transpose_b else ''} is {k2}x{n}; the inner sizes must match")
    size = math.lcm(*wafer.mesh.shape)  # the grid of blocks: each core holds (size/height) x (size/width)
    mp, kp, np_ = _up(m, size), _up(k, size), _up(n, size)
    _place(wafer, "_gemm_a", a, (mp, kp), Spec("y", "x"))
    if not transpose_b and not isinstance(b, TensorShape) and not wafer.cost_only:
        # the host lays B's k blocks out in the order the rings meet A's (identity on a square mesh)
        b = np.pad(np.asarray(b), [(0, kp - k), (0, np_ - n)])
        b = b.reshape(size, kp // size, np_)[b_row_order(wafer.mesh, algo)].reshape(kp, np_)
    _place(wafer, "_gemm_b", b, (np_, kp) if transpose_b else (kp, np_), Spec("y", "x"))
    dtype = a.dtype if isinstance(a, TensorShape) else np.asarray(a).dtype
    wafer.alloc("_gemm_c", (mp, np_), dtype, Spec("y", "x"))
    wafer.reset_clocks()
    try:
        if transpose_b:
            stats = wafer.run(gemm_t, a="_gemm_a", b="_gemm_b", c="_gemm_c", **options)
        else:
            stats = wafer.run(mesh_gemm, a="_gemm_a", b="_gemm_b", c="_gemm_c", algo=algo, **options)
        c = None if wafer.cost_only else wafer.read("_gemm_c")[:m, :n]
    finally:
        for name in ("_gemm_a", "_gemm_b", "_gemm_c"):
            wafer.free(name)
    return c, stats
