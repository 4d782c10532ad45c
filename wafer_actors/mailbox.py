"""A tile's mailbox: the messages of a run, from other tiles and from itself, waiting to be taken.

A message is kept under (run, step tag, source tile) until the protocol takes it, so messages
may arrive in any order and before their receive starts. An aborted run's receives raise
``ProtocolAborted`` instead of waiting for messages that will not come.
"""

from __future__ import annotations

import asyncio

from .errors import ProtocolAborted
from .fabric.wire import Message, decode


class Mailbox:
    """The messages addressed to one tile, per run."""

    def __init__(self, index: int):
        self.index = index
        self.run_id = -1
        self.aborted_run = -1
        self._mail: dict[tuple[int, str, int], asyncio.Future] = {}
        self._waiting: tuple[str, int, asyncio.Future] | None = None  # the receive the run is blocked in

    def start(self, run_id: int) -> None:
        """Begin run ``run_id``: drop what is left of earlier (aborted) runs.

        Raises:
            ProtocolAborted: the run was aborted before it started.
        """
        if run_id <= self.aborted_run:
            raise ProtocolAborted(f"tile {self.index}: run {run_id} was aborted before it started")
        for key in [k for k in self._mail if k[0] < run_id]:
            del self._mail[key]
        self.run_id = run_id

    def put(self, msg: Message) -> None:
        """Accept a message (the tile's own, or one decoded from another tile)."""
        self._slot(msg.tag, msg.src, msg.run).set_result(msg)

    def deliver(self, raw: bytes | memoryview) -> None:
        """Accept an encoded message from another tile (called by the transport); an aborted run's is dropped."""
        msg = decode(raw)
        if msg.run > self.aborted_run:
            self.put(msg)

    async def take(self, tag: str, src: int) -> Message:
        """Wait for the message ``tag`` of this run from tile ``src``."""
        fut = self._slot(tag, src, self.run_id)
        if self.aborted_run >= self.run_id and not fut.done():
            raise ProtocolAborted(f"tile {self.index}: run {self.run_id} was aborted")
        self._waiting = (tag, src, fut)
        try:
            return await fut
        finally:
            self._waiting = None
            del self._mail[(self.run_id, tag, src)]

    def has(self, tag: str, src: int) -> bool:
        """Whether the message ``tag`` of this run from tile ``src`` has arrived."""
        fut = self._mail.get((self.run_id, tag, src))
        return fut is not None and fut.done()

    def waiting_for(self) -> tuple[str, int] | None:
        """(step tag, source tile) of the message the run waits for and no tile has sent; None if running."""
        if self._waiting is None or self._waiting[2].done():
            return None
        return self._waiting[:2]

    def abort(self, run_id: int) -> None:
        """Stop run ``run_id``: every receive still waiting raises ``ProtocolAborted``."""
        self.aborted_run = max(self.aborted_run, run_id)
        for (rid, _, _), fut in list(self._mail.items()):
            if rid <= run_id and not fut.done():
                fut.set_exception(ProtocolAborted(f"tile {self.index}: run {rid} was aborted"))

    def _slot(self, tag: str, src: int, run_id: int) -> asyncio.Future:
        key = (run_id, tag, src)
        fut = self._mail.get(key)
        if fut is None:
            fut = self._mail[key] = asyncio.get_running_loop().create_future()
        return fut
