"""Geometry of a core mesh: coordinates, directions, neighbours and tiles.

Conventions (as in CSL and WaferLLM): arrays over cores are indexed ``[y, x]``;
``y`` grows SOUTH and ``x`` grows EAST; the mesh axes are named ``"y"`` and ``"x"``.
Neighbours are always listed in the order (y, -1), (y, +1), (x, -1), (x, +1).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .errors import InvalidArgument

NO_CORE = -1  # index of the missing neighbour at an open edge (MPI's PROC_NULL)
AXES = ("y", "x")


class Core(NamedTuple):
    """A core's coordinates on the mesh."""

    y: int
    x: int


class Dir(enum.Enum):
    """The four fabric directions, each with its (dy, dx) step."""

    NORTH = (-1, 0)
    SOUTH = (1, 0)
    WEST = (0, -1)
    EAST = (0, 1)

    @property
    def dy(self) -> int:
        return self.value[0]

    @property
    def dx(self) -> int:
        return self.value[1]


def axis_index(axis: str) -> int:
    """Return 0 for ``"y"`` and 1 for ``"x"``.

    Raises:
        ValueError: any other axis name.
    """
    if axis not in AXES:
        raise InvalidArgument(f"mesh axis must be 'y' or 'x', got {axis!r}")
    return AXES.index(axis)


@dataclass(frozen=True)
class Mesh:
    """A rectangular grid of ``height x width`` cores: a region's, or a whole wafer's.

    A mesh has shape and axis names but no actors: the same object serves full-numerics
    runs and cost-only runs.
    """

    height: int
    width: int

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise InvalidArgument(f"mesh {name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def size(self) -> int:
        return self.height * self.width

    def axis_size(self, axis: str) -> int:
        return self.shape[axis_index(axis)]

    def shift(self, axis: str, disp: int, *, wrap: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Return who each core receives from and sends to in a shift by ``disp`` along ``axis``.

        Like MPI's ``Cart_shift``: ``source[i]`` and ``dest[i]`` are the indices along ``axis``
        of core i's partners, ``NO_CORE`` at an open edge unless ``wrap`` closes the ring.

        Returns:
            (source, dest), two int arrays of length ``axis_size(axis)``.
        """
        n = self.axis_size(axis)
        idx = np.arange(n)
        source, dest = idx - disp, idx + disp
        if wrap:
            return source % n, dest % n
        source = np.where((source >= 0) & (source < n), source, NO_CORE)
        dest = np.where((dest >= 0) & (dest < n), dest, NO_CORE)
        return source, dest

    def __repr__(self) -> str:
        return f"Mesh(height={self.height}, width={self.width})"


@dataclass(frozen=True)
class TileRect:
    """The rectangle of cores ``[y0, y1) x [x0, x1)`` owned by tile number ``index``."""

    index: int
    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.y1 - self.y0, self.x1 - self.x0)

    def contains(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Elementwise: is core (y, x) inside this tile?"""
        return (y >= self.y0) & (y < self.y1) & (x >= self.x0) & (x < self.x1)


def split_tiles(mesh: Mesh, tiles: tuple[int, int]) -> list[TileRect]:
    """Split ``mesh`` into ``tiles[0] x tiles[1]`` rectangles, row-major.

    Sides that do not divide evenly give tiles whose sizes differ by at most one core.

    Raises:
        ValueError: a tile count is not positive or exceeds the mesh side.
    """
    if len(tiles) != 2:
        raise InvalidArgument(f"tiles must be (rows, cols), got {tiles!r}")
    for axis, count, size in zip(AXES, tiles, mesh.shape):
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count <= 0:
            raise InvalidArgument(f"tile count along {axis} must be a positive integer, got {count!r}")
        if count > size:
            raise InvalidArgument(f"cannot split {size} cores along {axis} into {count} tiles; use at most {size}")
    ys = even_bounds(mesh.height, tiles[0])
    xs = even_bounds(mesh.width, tiles[1])
    rects = []
    for i in range(tiles[0]):
        for j in range(tiles[1]):
            rects.append(TileRect(len(rects), ys[i], ys[i + 1], xs[j], xs[j + 1]))
    return rects


def even_bounds(size: int, parts: int) -> list[int]:
    """Cut ``size`` consecutive items into ``parts`` runs whose lengths differ by one at most."""
    base, extra = divmod(size, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return bounds


class Tiling:
    """A mesh split into tiles: the rectangles and, for each core, the tile that owns it.

    With ``region`` and ``origins``, the mesh (a wafer) holds equal regions of ``region``
    cores whose top-left cores are ``origins``; each region is split into ``tiles``, numbered
    region by region, and cores of no region belong to no tile (owner -1). By default the
    whole mesh is one region.
    """

    def __init__(self, mesh: Mesh, tiles: tuple[int, int], region: tuple[int, int] | None = None,
                 origins: tuple[tuple[int, int], ...] = ((0, 0),)):
        self.mesh = mesh
        self.tiles = (int(tiles[0]), int(tiles[1]))
        self.region = mesh.shape if region is None else (int(region[0]), int(region[1]))
        self.origins = tuple((int(y), int(x)) for y, x in origins)
        local = split_tiles(Mesh(*self.region), self.tiles)
        self.rects = [TileRect(len(local) * i + t.index, t.y0 + y, t.y1 + y, t.x0 + x, t.x1 + x)
                      for i, (y, x) in enumerate(self.origins) for t in local]
        self.owner = np.full(mesh.shape, -1, dtype=np.int32)  # [y, x] -> tile index
        for r in self.rects:
            if r.y1 > mesh.height or r.x1 > mesh.width or (self.owner[r.y0 : r.y1, r.x0 : r.x1] >= 0).any():
                raise InvalidArgument(f"regions of {self.region[0]}x{self.region[1]} cores at {list(self.origins)} "
                                      f"overlap or leave the {mesh.height}x{mesh.width} mesh")
            self.owner[r.y0 : r.y1, r.x0 : r.x1] = r.index

    @property
    def key(self) -> tuple:
        """A value that identifies this tiling in every process."""
        return self.mesh.shape + self.tiles + self.region + self.origins

    @property
    def per_region(self) -> int:
        """Tiles in each region."""
        return self.tiles[0] * self.tiles[1]

    def region_tiling(self) -> "Tiling":
        """One region alone, as a mesh of its own (every region is split alike)."""
        return Tiling(Mesh(*self.region), self.tiles)

    def __len__(self) -> int:
        return len(self.rects)

    def __repr__(self) -> str:
        more = "" if len(self.origins) == 1 and self.region == self.mesh.shape else f", region={self.region}, origins={self.origins}"
        return f"Tiling({self.mesh!r}, tiles={self.tiles}{more})"


def parse_grid(text: str) -> tuple[int, int]:
    """Parse ``"24x24"`` (rows x cols) into a pair of ints.

    Raises:
        ValueError: not two positive integers separated by ``x``.
    """
    parts = str(text).lower().split("x")
    try:
        rows, cols = (int(p) for p in parts)
    except ValueError:
        raise InvalidArgument(f"expected ROWSxCOLS such as '4x4', got {text!r}") from None
    if rows <= 0 or cols <= 0:
        raise InvalidArgument(f"expected positive ROWSxCOLS, got {text!r}")
    return rows, cols
