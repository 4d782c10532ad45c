"""The interface every transport implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

from ..device import DeviceSpec
from ..errors import ProtocolAborted
from ..mesh import Tiling

LOAD_BYTES = 8 << 20  # the most one call to a tile carries when the host loads a tensor (in bands of core rows)


class Transport(ABC):
    """Starts one ``Tile`` per tile rectangle and carries calls to them.

    Tiles send each other messages directly (the transport wires them up in ``spawn``);
    the driver only makes one call per tile per operation.
    """

    @abstractmethod
    def spawn(self, tiling: Tiling, device: DeviceSpec, cost_only: bool, executor: str) -> None:
        """Start the tiles (each running collectives with ``executor``) and connect them to each other."""

    @abstractmethod
    def call(self, method: str, args: list[tuple]) -> list[Any]:
        """Call ``Tile.method(*args[i])`` on every tile i at once; return the results in tile order."""

    @abstractmethod
    def call_some(self, method: str, args: dict[int, tuple]) -> dict[int, Any]:
        """Call ``Tile.method(*args[i])`` on the tiles i in ``args`` only; return {i: result}."""

    def call_stream(self, method: str, batches: Iterable[dict[int, tuple]]) -> None:
        """``call_some`` for each batch in turn, the results dropped (a transport may overlap a few batches)."""
        for args in batches:
            self.call_some(method, args)

    @abstractmethod
    def run(self, path: str, run_id: int, routes: list[str], kwargs: dict[str, Any], io: list[dict[str, Any]]
            ) -> list[dict[str, Any]]:
        """Run a protocol on every tile (``io[i]``: what tile i loads before and reads back after, see ``Tile.run``);
        if one tile fails, abort the others and raise its error."""

    @abstractmethod
    def nodes(self) -> list[str]:
        """Return the cluster node each tile runs on."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the tiles."""


def first_error(errors: list[BaseException | None]) -> BaseException:
    """Pick the error that caused a failed run: the first one that is not a knock-on abort."""
    real = [e for e in errors if e is not None and not isinstance(e, ProtocolAborted)]
    return (real or [e for e in errors if e is not None])[0]
