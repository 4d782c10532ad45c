"""A tile's SRAM: named per-core buffers and the bytes each core holds.

``Memory`` is the part of ``Tile`` that allocates, names and frees buffers and keeps every
core's SRAM accounting (in use and high-water) against the device's budget. It reads the
tile's ``index``, ``rect``, ``device`` and ``cost_only`` and owns ``buffers``, ``used`` and
``high``. In a cost-only run a buffer has a shape and a charge but no data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .device import DeviceSpec
from .errors import CoreMemoryError, ProtocolError
from .mesh import TileRect
from .shards import Chunk, read_chunk

OPS = ("store", "add", "max")


@dataclass
class Buffer:
    """A named per-core buffer: every charged core holds a block of ``block`` shape."""

    block: tuple[int, ...]
    dtype: np.dtype
    cores: np.ndarray  # bool [h, w]: cores charged for (and meant to hold) the block
    data: np.ndarray | None  # [h, w, *block]; None in cost-only runs
    alias: bool = False  # a name for part of another buffer: shares its memory, charges nothing

    @property
    def nbytes(self) -> int:
        """Bytes of one core's block."""
        return math.prod(self.block) * self.dtype.itemsize

    def part_bytes(self, select: tuple[slice, ...]) -> int:
        """Bytes of the part ``select`` of one core's block (a DSD over part of the buffer)."""
        kept = math.prod(len(range(*s.indices(n))) for s, n in zip(select, self.block))
        return kept * math.prod(self.block[len(select):]) * self.dtype.itemsize

    @property
    def stacked(self) -> bool:
        """Whether the buffer was allocated stacked (each entry of its first block axis contiguous over the cores)."""
        d = self.data
        return d is not None and d.ndim > 2 and not d.flags.c_contiguous and np.moveaxis(d, 2, 0).flags.c_contiguous


def combine_blocks(buf: Buffer, fi: np.ndarray | slice, incoming: np.ndarray, op: str) -> None:
    """Write (or add, or max) received blocks into the cores ``fi`` (flat local indices, distinct; or a slice) of ``buf``."""
    if incoming.shape[1:] != buf.block:
        raise ProtocolError(f"received blocks of shape {incoming.shape[1:]} into a buffer with blocks {buf.block}")
    if buf.alias:  # a strided view (one layer of a stack): index it by (row, column), never through a copy
        if isinstance(fi, slice):
            fi = np.arange(fi.start, fi.stop)
        flat, fi = buf.data, np.unravel_index(fi, buf.data.shape[:2])
    else:
        flat = buf.data.reshape((-1,) + buf.block)
    if op == "store":
        flat[fi] = incoming
    elif op == "add":
        flat[fi] += incoming
    else:
        flat[fi] = np.maximum(flat[fi], incoming)


class Memory:
    """Buffers and SRAM accounting of a tile's cores (a part of ``Tile``)."""

    number: int  # the tile's number on the wafer, read here
    rect: TileRect
    device: DeviceSpec
    cost_only: bool

    def __init__(self) -> None:
        shape = self.rect.shape
        self.used = np.zeros(shape, dtype=np.int64)  # SRAM bytes in use
        self.high = np.zeros(shape, dtype=np.int64)  # SRAM high-water mark
        self.buffers: dict[str, Buffer] = {}

    def alloc(self, name: str, block: tuple[int, ...], dtype: str, cores: np.ndarray | None = None, stacked: bool = False) -> None:
        """Allocate a zeroed block on each core (or the cores in the local mask ``cores``).

        ``stacked``: the block's first axis indexes a stack (layers); each of its entries is
        kept contiguous over the tile's cores, so a per-layer kernel reads one sweep of memory.
        The buffer still reads as ``[h, w, *block]``.

        Raises:
            CoreMemoryError: a core would exceed its SRAM budget; nothing is changed.
        """
        dtype = np.dtype(dtype)
        block = tuple(int(b) for b in block)
        mask = np.ones(self.rect.shape, dtype=bool) if cores is None else np.asarray(cores, dtype=bool)
        buf = Buffer(block, dtype, mask, None)
        old = self.buffers.get(name)
        used = self.used - (old.nbytes * old.cores if old and not old.alias else 0)
        after = used + buf.nbytes * mask
        over = np.argwhere(after > self.device.sram_bytes)
        if len(over):
            y, x = (int(v) for v in over[0])
            raise CoreMemoryError((self.rect.y0 + y, self.rect.x0 + x), name, buf.nbytes, int(used[y, x]), self.device.sram_bytes)
        if not self.cost_only:
            if stacked and block:
                buf.data = np.moveaxis(np.zeros(block[:1] + self.rect.shape + block[1:], dtype=dtype), 0, 2)
            else:
                buf.data = np.zeros(self.rect.shape + block, dtype=dtype)
        self.buffers[name] = buf
        self.used = after
        np.maximum(self.high, self.used, out=self.high)
        self._buffers_changed()

    def put(self, name: str, blocks: np.ndarray, stacked: bool = False) -> None:
        """Store host data ``[h, w, *block]`` in buffer ``name`` (the host's memcpy to the cores)."""
        blocks = np.asarray(blocks)
        if blocks.shape[:2] != self.rect.shape:
            raise ValueError(f"tile {self.number}: blocks of shape {blocks.shape} do not cover the tile's {self.rect.shape} cores")
        self.alloc(name, blocks.shape[2:], blocks.dtype.str, stacked=stacked)
        if not self.cost_only:
            self.buffers[name].data[...] = blocks

    def put_part(self, name: str, entry: int | None, row: int, blocks: np.ndarray) -> None:
        """Store host data ``[r, w, *block]`` in the local core rows ``row .. row + r`` of buffer ``name`` (allocated),
        or, with ``entry``, in that entry of each block of the stacked buffer (``blocks`` then ``[r, w, *entry]``)."""
        buf = self.buffer(name)
        rows, (h, w) = len(blocks), self.rect.shape
        if not 0 <= row <= h - rows or blocks.shape[1:] != (w,) + (buf.block if entry is None else buf.block[1:]):
            raise ValueError(f"tile {self.number}: blocks of shape {blocks.shape} at core row {row} are not part of "
                             f"{name!r} ({self.rect.shape + buf.block}{'' if entry is None else f', entry {entry}'})")
        if not self.cost_only:
            if entry is None:
                buf.data[row : row + rows] = blocks
            else:
                buf.data[row : row + rows, :, entry] = blocks

    def load_chunk(self, path: str, chunk: Chunk) -> int:
        """Allocate buffer ``chunk.name`` and read its blocks from the shard file ``path`` on this tile's node
        (``shards``); return the bytes read.

        Raises:
            ShardError: the file is missing, truncated or corrupted.
            CoreMemoryError: the buffer does not fit.
        """
        self.alloc(chunk.name, chunk.block, chunk.dtype, stacked=chunk.stacked)
        buf = self.buffers[chunk.name]
        if not self.cost_only:
            read_chunk(path, chunk, np.moveaxis(buf.data, 2, 0) if chunk.stacked and chunk.block else buf.data)
        return chunk.nbytes

    def get(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> np.ndarray:
        """Return buffer ``name`` as ``[h, w, *block]``, or only the local ``rows`` / ``cols`` ranges."""
        data = self.data(name)
        if rows is not None:
            data = data[rows[0] : rows[1]]
        if cols is not None:
            data = data[:, cols[0] : cols[1]]
        return data

    def alias(self, name: str, of: str, index: tuple) -> None:
        """Name the part ``index`` of every block of ``of`` (one layer of stacked weights, a range of columns) ``name``.

        The alias shares ``of``'s memory and charges none.
        """
        if name in self.buffers and not self.buffers[name].alias:
            raise ProtocolError(f"tile {self.number}: cannot alias {name!r}: a buffer of that name exists")
        src = self.buffer(of)
        block = np.broadcast_to(np.zeros((), dtype=np.int8), src.block)[index].shape
        data = None if src.data is None else src.data[(slice(None), slice(None), *index)]
        self.buffers[name] = Buffer(block, src.dtype, src.cores, data, alias=True)
        self._buffers_changed()

    def free(self, name: str) -> None:
        """Release buffer ``name`` (an alias only drops its name)."""
        buf = self.buffer(name)
        if not buf.alias:
            self.used = self.used - buf.nbytes * buf.cores
        del self.buffers[name]
        self._buffers_changed()

    def _buffers_changed(self) -> None:
        """Called after a buffer is allocated, named, replaced or released: a subclass drops what it kept of them."""

    def memory(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (bytes in use, high-water bytes), per core."""
        return self.used.copy(), self.high.copy()

    def data(self, name: str) -> np.ndarray:
        """Return the data of buffer ``name``: ``[h, w, *block]``."""
        buf = self.buffer(name)
        if buf.data is None:
            raise ProtocolError(f"buffer {name!r} has no data: this wafer runs cost-only (shapes, no tensors)")
        return buf.data

    def buffer(self, name: str) -> Buffer:
        """Return the buffer ``name`` (its block shape, dtype and data).

        Raises:
            ProtocolError: no such buffer on this tile.
        """
        try:
            return self.buffers[name]
        except KeyError:
            raise ProtocolError(f"tile {self.number}: no buffer {name!r}; buffers: {sorted(self.buffers)}") from None
