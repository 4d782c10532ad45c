"""Layouts: which block of a tensor each core holds.

A ``Spec`` mirrors JAX's ``PartitionSpec``: one entry per tensor axis, ``None`` for an
axis every core holds whole, a mesh axis name (``"y"`` or ``"x"``) for an axis split over
that mesh axis, or a tuple of names for a split over several mesh axes, major to minor.
Mesh axes a spec does not name replicate the tensor. ``Spec("y", None)`` on a 4x8 mesh
gives core (y, x) rows ``[y*M/4, (y+1)*M/4)`` of an ``M x N`` matrix, for every x.

Host load and read-back are a reshape plus a transpose: ``scatter`` and ``gather`` are
inverses of each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import LayoutError
from .mesh import AXES, Mesh



class Spec(tuple):
    """A partition spec: ``Spec("y", None)``, ``Spec(("y", "x"))``, ..."""

    def __new__(cls, *entries: "str | tuple[str, ...] | None") -> "Spec":
        normal = []
        for e in entries:
            if isinstance(e, (list, tuple)):
                e = tuple(e)
                if len(e) == 1:
                    e = e[0]
                elif len(e) == 0:
                    e = None
            normal.append(e)
        return super().__new__(cls, normal)

    def mesh_axes(self, i: int) -> tuple[str, ...]:
        """Return the mesh axes tensor axis ``i`` is split over, major first."""
        e = self[i]
        if e is None:
            return ()
        return e if isinstance(e, tuple) else (e,)

    def __repr__(self) -> str:
        return f"Spec({', '.join(repr(e) for e in self)})"


@dataclass(frozen=True)
class Layout:
    """A spec placed on a mesh. Validated once, when built.

    Raises:
        LayoutError: an entry names an unknown mesh axis or names one twice.
    """

    mesh: Mesh
    spec: Spec

    def __post_init__(self) -> None:
        if not isinstance(self.spec, Spec):
            object.__setattr__(self, "spec", Spec(*self.spec))
        seen: list[str] = []
        for i in range(len(self.spec)):
            for a in self.spec.mesh_axes(i):
                if a not in AXES:
                    raise LayoutError(f"{self.spec!r}: unknown mesh axis {a!r} for tensor axis {i}; use 'y' or 'x'")
                if a in seen:
                    raise LayoutError(f"{self.spec!r}: mesh axis {a!r} is used twice; each mesh axis splits one tensor axis")
                seen.append(a)

    def parts(self, i: int) -> int:
        """Number of blocks tensor axis ``i`` is split into."""
        return math.prod(self.mesh.axis_size(a) for a in self.spec.mesh_axes(i))

    def block_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Return the block one core holds of a tensor of ``shape``.

        Raises:
            LayoutError: rank mismatch, or a split axis that the mesh does not divide.
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) != len(self.spec):
            raise LayoutError(f"tensor of shape {shape} has {len(shape)} axes but {self.spec!r} has {len(self.spec)} entries")
        block = []
        for i, size in enumerate(shape):
            n = self.parts(i)
            if size % n:
                raise LayoutError(
                    f"tensor axis {i} of size {size} cannot be split over mesh axes {self.spec.mesh_axes(i)} "
                    f"({n} parts) of {self.mesh!r}: {size} is not a multiple of {n}; pad it to "
                    f"{-(-size // n) * n} or choose another mesh"
                )
            block.append(size // n)
        return tuple(block)

    def replicated_axes(self) -> tuple[str, ...]:
        used = {a for i in range(len(self.spec)) for a in self.spec.mesh_axes(i)}
        return tuple(a for a in AXES if a not in used)

    def __repr__(self) -> str:
        return f"Layout({self.mesh!r}, {self.spec!r})"


def _split_shape(layout: Layout, shape: Sequence[int]) -> tuple[list[int], dict[str, int], list[int]]:
    """Shape of the tensor with each split axis opened into (mesh axes..., block)."""
    block = layout.block_shape(shape)
    parts: list[int] = []
    mesh_pos: dict[str, int] = {}
    block_pos: list[int] = []
    for i in range(len(shape)):
        for a in layout.spec.mesh_axes(i):
            mesh_pos[a] = len(parts)
            parts.append(layout.mesh.axis_size(a))
        block_pos.append(len(parts))
        parts.append(block[i])
    return parts, mesh_pos, block_pos


def scatter(array: np.ndarray, layout: Layout) -> np.ndarray:
    """Return the per-core blocks of ``array``: shape ``(height, width, *block)``."""
    parts, mesh_pos, block_pos = _split_shape(layout, array.shape)
    opened = np.asarray(array).reshape(parts)
    used = [a for a in AXES if a in mesh_pos]
    moved = np.transpose(opened, [mesh_pos[a] for a in used] + block_pos)
    for a in AXES:  # insert a length-1 axis for each replicated mesh axis, then broadcast
        if a not in mesh_pos:
            moved = np.expand_dims(moved, AXES.index(a))
    out_shape = layout.mesh.shape + moved.shape[2:]
    return np.ascontiguousarray(np.broadcast_to(moved, out_shape))


def gather(blocks: np.ndarray, layout: Layout, shape: Sequence[int]) -> np.ndarray:
    """Inverse of ``scatter``: rebuild a tensor of ``shape`` from per-core blocks.

    Along replicated mesh axes the copy on core index 0 is read; ``blocks`` may hold just
    that copy (size 1 along those axes).
    """
    parts, mesh_pos, block_pos = _split_shape(layout, shape)
    expect = layout.mesh.shape + layout.block_shape(shape)
    reduced = tuple(1 if a not in mesh_pos else n for a, n in zip(AXES, layout.mesh.shape)) + expect[2:]
    if tuple(blocks.shape) not in (expect, reduced):
        raise LayoutError(f"per-core blocks have shape {tuple(blocks.shape)}, expected {expect} for {layout!r}")
    used = [a for a in AXES if a in mesh_pos]
    sel = tuple(slice(None) if a in mesh_pos else 0 for a in AXES)
    moved = blocks[sel]  # (*used mesh axes, *block)
    order = [mesh_pos[a] for a in used] + block_pos
    opened = np.transpose(moved, np.argsort(order))
    return opened.reshape(tuple(int(s) for s in shape))
