"""The bytes of a message between tiles: a fixed header, then the arrays' raw little-endian bytes.

No pickle: any process (or language) can read a message from this layout alone::

    header  <q run> <q src> <q flows> <i data ndim, -1: no data> <8s data dtype, numpy's str> <H tag bytes>
    tag     utf-8, then the data shape (ndim <q>), then zeros up to a multiple of 8 bytes
    arrays  head, tail (<f8), stages (<i8), compute (<f8): ``flows`` each; then the data, C order, and zeros up
            to a multiple of 8 bytes

Every array starts at a multiple of 8 bytes from the message's start, and a message's length is one too, so a
receiver reads the arrays in place, aligned, also from a stream of messages framed by 8-byte lengths.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

_HEADER = struct.Struct("<qqqi8sH")
_F8, _I8 = np.dtype("<f8"), np.dtype("<i8")
_TIMES = (_F8, _F8, _I8, _F8)  # head, tail, stages, compute


@dataclass(frozen=True)
class Message:
    """One message from tile ``src`` for the transfer step ``tag``.

    Attributes:
        run: the protocol run the message belongs to.
        tag: names the transfer step within the run (same on sender and receiver).
        src: index of the sending tile.
        data: one block per distinct source core, ``(n_sources, *block)``; None in cost-only runs.
        head: per flow, the cycle its first byte reaches the destination core (in the fused executor's
            batches, per distinct source, as ``data``: the cycle its first byte leaves, ``timing.departure``;
            the receiver knows each flow's path, so it computes each flow's arrival from that).
        tail: per flow, the cycle its last byte reaches the destination core (in batches, per distinct
            source: its clock, before which the last byte cannot leave).
        stages: per flow, software relay stages on the critical path behind it (in batches, per distinct
            source: every flow of a source carries its source's record).
        compute: per flow, compute cycles on the critical path behind it (the same).
    """

    run: int
    tag: str
    src: int
    data: np.ndarray | None
    head: np.ndarray
    tail: np.ndarray
    stages: np.ndarray
    compute: np.ndarray


def encode(msg: Message) -> bytes:
    """Serialise a message."""
    n, tag, data = len(msg.stages), msg.tag.encode(), msg.data
    head = _HEADER.size + len(tag) + (0 if data is None else 8 * data.ndim)
    parts = [_HEADER.pack(msg.run, msg.src, n, -1 if data is None else data.ndim,
                          b"" if data is None else data.dtype.str.encode(), len(tag)), tag]
    if data is not None:
        parts.append(struct.pack(f"<{data.ndim}q", *data.shape))
    parts.append(bytes(-head % 8))
    for a, t in zip((msg.head, msg.tail, msg.stages, msg.compute), _TIMES):
        parts.append((a if a.dtype == t else a.astype(t)).tobytes())
    if data is not None:
        parts.append(data.tobytes())  # (C order whatever its layout)
        parts.append(bytes(-data.nbytes % 8))
    return b"".join(parts)


def decode(raw: bytes | memoryview) -> Message:
    """Read a message written by ``encode`` (its arrays are read-only views of ``raw``)."""
    run, src, n, ndim, dtype, taglen = _HEADER.unpack_from(raw)
    at = _HEADER.size + taglen
    tag = bytes(raw[_HEADER.size : at]).decode()
    shape = struct.unpack_from(f"<{max(ndim, 0)}q", raw, at)
    at += 8 * max(ndim, 0)
    at += -at % 8
    times = np.frombuffer(raw, dtype=_F8, count=4 * n, offset=at).reshape(4, n)
    data = None
    if ndim >= 0:
        data = np.frombuffer(raw, dtype=np.dtype(dtype.rstrip(b"\0").decode()), count=math.prod(shape),
                             offset=at + 32 * n).reshape(shape)
    return Message(run, tag, src, data, times[0], times[1], times[2].view(_I8), times[3])
