"""The bytes of a message between tiles: msgpack, with arrays as raw bytes plus dtype and shape.

No pickle: a message is a map of plain values, so any process (or language) can read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import numpy as np


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


def _pack_array(a: np.ndarray) -> list:
    a = np.ascontiguousarray(a)
    return [a.dtype.str, list(a.shape), a.tobytes()]


def _unpack_array(v: list) -> np.ndarray:
    dtype, shape, raw = v
    return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape)


def encode(msg: Message) -> bytes:
    """Serialise a message."""
    return msgpack.packb(
        {
            "run": msg.run,
            "tag": msg.tag,
            "src": msg.src,
            "data": None if msg.data is None else _pack_array(msg.data),
            "head": _pack_array(msg.head),
            "tail": _pack_array(msg.tail),
            "stages": _pack_array(msg.stages),
            "compute": _pack_array(msg.compute),
        },
        use_bin_type=True,
    )


def decode(raw: bytes | memoryview) -> Message:
    """Read a message written by ``encode``."""
    m = msgpack.unpackb(raw, raw=False)
    data = None if m["data"] is None else _unpack_array(m["data"])
    arrays = (_unpack_array(m[k]) for k in ("head", "tail", "stages", "compute"))
    return Message(m["run"], m["tag"], m["src"], data, *arrays)
