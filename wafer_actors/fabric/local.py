"""In-process transport: every tile lives in the driver, on one asyncio event loop.

Messages are still encoded and decoded exactly as between processes, so this transport
runs the same code paths and predicts the same cycles as the Ray one; it is the one to
debug with.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from ..device import DeviceSpec
from ..errors import ProtocolError
from ..mesh import Tiling
from ..tile import Tile
from .base import Transport, first_error


class LocalTransport(Transport):
    """All tiles in this process."""

    def __init__(self) -> None:
        self.tiles: list[Tile] = []
        self._loop = asyncio.new_event_loop()

    def spawn(self, tiling: Tiling, device: DeviceSpec, cost_only: bool, executor: str) -> None:
        self.tiles = [Tile(i, tiling.mesh.shape, tiling.tiles, device, cost_only, executor, tiling.region, tiling.origins)
                      for i in range(len(tiling))]
        nodes = self.nodes()
        for t in self.tiles:
            t.connect(self._post, nodes)

    def _post(self, dest: int, raw: bytes) -> None:
        self.tiles[dest].mailbox.deliver(raw)

    def call(self, method: str, args: list[tuple]) -> list[Any]:
        return [getattr(t, method)(*a) for t, a in zip(self.tiles, args)]

    def call_some(self, method: str, args: dict[int, tuple]) -> dict[int, Any]:
        return {i: getattr(self.tiles[i], method)(*a) for i, a in args.items()}

    def run(self, path: str, run_id: int, routes: list[str], kwargs: dict[str, Any], io: list[dict[str, Any]]
            ) -> list[dict[str, Any]]:
        return self._loop.run_until_complete(self._run(path, run_id, routes, kwargs, io))

    async def _run(self, path: str, run_id: int, routes: list[str], kwargs: dict[str, Any], io: list[dict[str, Any]]
                   ) -> list[dict[str, Any]]:
        tasks = [asyncio.ensure_future(t.run(path, run_id, routes, kwargs, a)) for t, a in zip(self.tiles, io)]
        watch = asyncio.ensure_future(self._watch(tasks))
        await asyncio.wait([*tasks, watch], return_when=asyncio.FIRST_EXCEPTION)
        if watch.done() and watch.exception():
            for tile in self.tiles:
                tile.mailbox.abort(run_id)
            await asyncio.wait(tasks)
            for t in tasks:
                t.exception()  # each tile's ProtocolAborted is a knock-on of the deadlock reported here
            raise watch.exception()
        watch.cancel()
        if any(t.done() and t.exception() for t in tasks):
            for tile in self.tiles:
                tile.mailbox.abort(run_id)
            await asyncio.wait(tasks)
            raise first_error([t.exception() for t in tasks])
        return [t.result() for t in tasks]

    async def _watch(self, tasks: list[asyncio.Future]) -> None:
        """Raise ``ProtocolError`` once every unfinished tile waits for a message that no tile has sent.

        Messages between in-process tiles are delivered when sent, so that state is exactly a
        deadlock: only a running tile could still send.
        """
        while True:
            await asyncio.sleep(0)  # let every ready tile run first
            live = [(t, t.mailbox.waiting_for()) for t, task in zip(self.tiles, tasks) if not task.done()]
            if not live:
                return
            if all(w is not None for _, w in live):
                waits = "; ".join(f"tile {t.index} waits for {tag!r} from tile {src}" for t, (tag, src) in live)
                raise ProtocolError(f"deadlock: every running tile waits for a message no tile will send ({waits})")

    def nodes(self) -> list[str]:
        return [socket.gethostname()] * len(self.tiles)

    def shutdown(self) -> None:
        self.tiles = []
        self._loop.close()
