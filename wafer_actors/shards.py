"""Tile shards: files that hold a tile's buffers exactly as the tile keeps them in memory.

A shard is one file per tile. Each of its chunks is one buffer's data in the tile's own
memory order (``[h, w, *block]``; stacked: ``[block[0], h, w, *block[1:]]``), starting at a
multiple of ``ALIGN`` and checked by a CRC-32. Loading a chunk is one sequential read into
the buffer the tile allocated: no re-layout, nothing through the driver. The checksum of a
piece runs on a second thread while the next piece is read (``zlib.crc32`` releases the GIL),
so checking costs no more than reading.
"""

from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from .errors import InputError

ALIGN = 4096  # chunks start on page boundaries (direct, aligned reads)
PIECE = 16 << 20  # bytes read (and checksummed) at a time


class ShardError(InputError, OSError):
    """A shard file is missing, truncated or corrupted: the message names the file and the chunk."""


@dataclass(frozen=True)
class Chunk:
    """Where one buffer's data lies in a shard file.

    ``dtype`` is the buffer's element type on the cores, ``stored`` the file's (a float16 file
    widens into float32 buffers as it is read).
    """

    name: str
    block: tuple[int, ...]
    dtype: str
    stored: str
    stacked: bool
    offset: int
    nbytes: int
    crc32: int

    def as_json(self) -> dict:
        return {"name": self.name, "block": list(self.block), "dtype": self.dtype, "stored": self.stored,
                "stacked": self.stacked, "offset": self.offset, "nbytes": self.nbytes, "crc32": self.crc32}

    @classmethod
    def from_json(cls, d: dict) -> Chunk:
        return cls(d["name"], tuple(d["block"]), d["dtype"], d["stored"], bool(d["stacked"]), int(d["offset"]),
                   int(d["nbytes"]), int(d["crc32"]))


def in_tile_order(blocks: np.ndarray, stacked: bool) -> np.ndarray:
    """A tile's blocks ``[h, w, *block]`` in the order the tile keeps them in memory (see ``Tile.alloc``)."""
    return np.moveaxis(blocks, 2, 0) if stacked and blocks.ndim > 2 else blocks


def write_chunk(f: BinaryIO, name: str, blocks: np.ndarray, stacked: bool, stored: str, dtype: str = "float32") -> Chunk:
    """Append one tile's blocks ``[h, w, *block]`` of buffer ``name`` to the shard ``f`` (open for writing), in the
    tile's memory order, at the next aligned offset."""
    offset = -(-f.tell() // ALIGN) * ALIGN
    f.write(b"\0" * (offset - f.tell()))
    raw = memoryview(np.ascontiguousarray(in_tile_order(blocks, stacked), dtype=stored)).cast("B")
    f.write(raw)
    return Chunk(name, tuple(int(b) for b in blocks.shape[2:]), np.dtype(dtype).str, np.dtype(stored).str, stacked,
                 offset, raw.nbytes, zlib.crc32(raw))


def read_chunk(path: str, chunk: Chunk, out: np.ndarray) -> None:
    """Read ``chunk`` of the shard ``path`` into ``out`` (C-contiguous, the chunk's shape in tile order).

    Raises:
        ShardError: no such file, the file ends before the chunk does, or its checksum differs.
    """
    stored = np.dtype(chunk.stored)
    if out.nbytes // out.itemsize * stored.itemsize != chunk.nbytes:
        raise ShardError(f"{path}: chunk {chunk.name!r} holds {chunk.nbytes} bytes; the buffer it fills needs "
                         f"{out.size} x {stored.itemsize}")
    into = out if stored == out.dtype else np.empty(out.shape, stored)
    raw = memoryview(into).cast("B")
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ShardError(f"no such shard file {path} (a converted checkpoint must be at the same path on every node "
                         "that runs its tiles: on shared storage or copied to each)") from None
    crc, pending = 0, None
    with ThreadPoolExecutor(1) as checker:
        try:
            done = 0
            while done < chunk.nbytes:
                n = os.preadv(fd, [raw[done : done + PIECE]], chunk.offset + done)
                if n == 0:
                    raise ShardError(f"{path} is truncated: it ends at byte {chunk.offset + done:,}, inside chunk "
                                     f"{chunk.name!r} (bytes {chunk.offset:,} to {chunk.offset + chunk.nbytes:,}); "
                                     "convert the model again")
                if pending is not None:
                    crc = pending.result()
                pending = checker.submit(zlib.crc32, raw[done : done + n], crc)
                done += n
            crc = pending.result() if pending is not None else zlib.crc32(b"")
        finally:
            os.close(fd)
    if crc != chunk.crc32:
        raise ShardError(f"{path}: chunk {chunk.name!r} (bytes {chunk.offset:,} to {chunk.offset + chunk.nbytes:,}) "
                         f"is corrupted: CRC-32 {crc:08x}, the index says {chunk.crc32:08x}; convert the model again")
    if into is not out:
        out[...] = into
