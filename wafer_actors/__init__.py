"""An emulated wafer-scale accelerator: a core mesh spread over (Ray) actors."""

from .device import DeviceSpec, preset
from .heap import keep_temporaries_in_heap
from .errors import (CoreMemoryError, DeviceSpecError, InputError, InvalidArgument, LayoutError, NodeMemoryError,
                     ProtocolAborted, ProtocolError, RoutingError, TileLost)
from .layout import Layout, Spec, gather, scatter
from .mesh import Core, Dir, Mesh, Tiling
from .wafer import Region, RunStats, Wafer

__all__ = [
    "Core", "CoreMemoryError", "DeviceSpec", "DeviceSpecError", "Dir", "InputError", "InvalidArgument",
    "Layout", "LayoutError", "Mesh", "NodeMemoryError", "ProtocolAborted", "ProtocolError", "Region", "RoutingError",
    "RunStats", "Spec", "TileLost", "Tiling", "Wafer", "gather", "preset", "scatter",
]

keep_temporaries_in_heap()  # in every process that imports the emulator, Ray workers included
