"""Direct channels between tile actors: a socket per ordered pair of tiles, Unix on one node, TCP across nodes.

A message sent as a Ray actor call (``deliver.remote``) pays task submission and two gRPC
hops: about 1-2 ms each on a busy 2-core machine, and a decode token that crosses tile
edges sends over a thousand of them. The same bytes written to a socket arrive in tens
of microseconds.

Framing: an 8-byte little-endian length, then the message bytes (``wire.encode``). Each
tile listens on one Unix socket and, where its wafer spans nodes, on one TCP port of its
node's address; every other tile connects once (to the Unix socket from the same node,
to the port from another) and only writes. Both stop listening, and the socket file is
removed, as soon as all of them are connected.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable

_LENGTH = 8
Address = tuple[str, tuple[str, int] | None]  # a tile's socket path, and its (host, port) where it listens on TCP


class Inbox:
    """The listening end: reads framed messages from every peer and hands each to ``deliver``."""

    def __init__(self, deliver: Callable[[memoryview], None]):
        self._deliver = deliver
        self._servers: list[asyncio.base_events.Server] = []
        self._dir = ""
        self._peers = 0
        self._joined = asyncio.Event()  # set whenever a peer connects

    @property
    def path(self) -> str:
        return os.path.join(self._dir, "tile.sock")

    async def open(self, host: str | None = None) -> Address:
        """Start listening (again, after a move) for peers that are not connected yet: on a Unix socket and, with
        ``host`` (this node's address), on a free TCP port of it; return where (``Address``)."""
        self._dir, self._peers = tempfile.mkdtemp(prefix="wafer-"), 0
        loop = asyncio.get_running_loop()
        self._servers = [await loop.create_unix_server(lambda: _Frames(self), path=self.path)]
        if host is None:
            return self.path, None
        tcp = await loop.create_server(lambda: _Frames(self), host=host, port=0)
        self._servers.append(tcp)
        return self.path, (host, tcp.sockets[0].getsockname()[1])

    def _joins(self) -> None:
        self._peers += 1
        self._joined.set()

    async def seal(self, peers: int) -> None:
        """Wait until ``peers`` tiles have connected, then stop listening and remove the socket file."""
        if not self._servers:
            return
        while self._peers < peers:
            self._joined.clear()
            await asyncio.wait_for(self._joined.wait(), timeout=60)
        for server in self._servers:
            server.close()
        self._servers = []
        os.unlink(self.path)
        os.rmdir(self._dir)


class _Frames(asyncio.Protocol):
    """One peer's connection: cuts the byte stream into messages and delivers each as soon as its last byte is in
    (in the event loop's read callback, so the waiting protocol resumes on the next turn of the loop)."""

    def __init__(self, inbox: Inbox):
        self._inbox = inbox
        self._buf = bytearray()  # the start of a message whose last bytes have not come yet
        self._need = _LENGTH  # bytes ``_buf`` must hold before it holds a whole message (or its length)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inbox._joins()

    def data_received(self, data: bytes) -> None:
        if self._buf:  # the rest of a message begun in an earlier read
            self._buf += data
            if len(self._buf) < self._need:  # a large message comes in many reads: gathered once, when whole
                return
            data = bytes(self._buf)
            self._buf.clear()
        view, start = memoryview(data), 0
        while len(data) - start >= _LENGTH:
            end = start + _LENGTH + int.from_bytes(view[start : start + _LENGTH], "little")
            if len(data) < end:
                break
            self._inbox._deliver(view[start + _LENGTH : end])
            start = end
        self._need = end - start if len(data) - start >= _LENGTH else _LENGTH
        self._buf += view[start:]


class Outbox:
    """The writing end toward one peer tile."""

    def __init__(self, writer: asyncio.StreamWriter):
        self._writer = writer

    @classmethod
    async def connect(cls, where: str | tuple[str, int]) -> Outbox:
        """Connect to a peer's Unix socket (a path) or TCP port ((host, port); asyncio sends without delay)."""
        if isinstance(where, str):
            _, writer = await asyncio.open_unix_connection(where)
        else:
            _, writer = await asyncio.open_connection(*where)
        return cls(writer)

    def close(self) -> None:
        self._writer.close()

    def post(self, raw: bytes) -> None:
        """Queue ``raw`` for the peer; the event loop writes what the socket does not take at once. One write: the
        peer wakes once per message, not once for its length and again for its bytes."""
        self._writer.write(len(raw).to_bytes(_LENGTH, "little") + raw)
