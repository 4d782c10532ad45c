"""Errors raised by the emulated wafer.

Each error subclasses the built-in it resembles and passes every field to
``super().__init__`` so that it pickles, and Ray re-raises it as its own type.

Errors caused by what was asked (a value outside what is valid, a size that does not fit
the device, a file that is not what it claims) also subclass ``InputError``: the command
line reports those in one line (exit 2). Any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations


class InputError(Exception):
    """Marks an error caused by the input, not by the emulator: the message says which value, why, and what is valid."""


class InvalidArgument(InputError, ValueError):
    """An argument outside what is valid."""


class CoreMemoryError(InputError, MemoryError):
    """A core was asked to hold more bytes than its SRAM budget."""

    def __init__(self, core: tuple[int, int], buffer: str, asked: int, in_use: int, budget: int):
        super().__init__(core, buffer, asked, in_use, budget)
        self.core, self.buffer, self.asked, self.in_use, self.budget = core, buffer, asked, in_use, budget

    def __str__(self) -> str:
        y, x = self.core
        return (
            f"core (y={y}, x={x}): buffer {self.buffer!r} needs {self.asked} B, budget {self.budget} B, "
            f"{self.in_use} B already in use; use a larger mesh, a smaller dtype or smaller blocks"
        )


class RoutingError(InputError, RuntimeError):
    """A core needs more routing entries (colours) than its router has."""

    def __init__(self, core: tuple[int, int], routes: tuple[str, ...], limit: int, needed: int):
        super().__init__(core, routes, limit, needed)
        self.core, self.routes, self.limit, self.needed = core, tuple(routes), limit, needed

    def __str__(self) -> str:
        y, x = self.core
        return (
            f"core (y={y}, x={x}) needs {self.needed} routing entries (at least), the device has {self.limit}: "
            f"routes {', '.join(self.routes)}; use fewer routes (relay through cores instead) or a device "
            f"with more colours"
        )


class LayoutError(InputError, ValueError):
    """A tensor layout does not fit the mesh or the tensor."""


class DeviceSpecError(InputError, ValueError):
    """A device description has an invalid or unknown field."""


class NodeMemoryError(InputError, MemoryError):
    """A cluster node has less memory for tile actors than the tiles placed on it could need."""


class ProtocolError(RuntimeError):
    """A protocol broke a rule of the fabric (for example two sources for one core in one step)."""


class ProtocolAborted(RuntimeError):
    """A tile stopped a protocol because another tile failed."""


class TileLost(RuntimeError):
    """A tile's process (or its node) died: the wafer's state on it is gone."""

    def __init__(self, tile: int, node: str, reason: str):
        super().__init__(tile, node, reason)
        self.tile, self.node, self.reason = tile, node, reason

    def __str__(self) -> str:
        return f"tile {self.tile} (on node {self.node[:12]}) was lost: {self.reason}"
