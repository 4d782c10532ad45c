"""The PLMR device model: what one wafer-scale chip offers a program.

PLMR (WaferLLM §3.1): massive Parallelism, non-uniform Latency (alpha per hop,
beta per software relay), small per-core Memory, limited Routing (colours per
router). A ``DeviceSpec`` holds those numbers; the emulator charges every
compute call and every message against them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import DeviceSpecError


@dataclass(frozen=True)
class DeviceSpec:
    """A wafer-scale device described by its PLMR parameters.

    Attributes:
        name: preset or file name, for reports.
        width: cores along x (EAST) on the fabric.
        height: cores along y (SOUTH) on the fabric.
        sram_bytes: local memory of one core, in bytes.
        clock_hz: core clock; predicted cycles / clock_hz = seconds.
        fmacs_per_cycle: fused multiply-adds one core retires per cycle, per dtype name.
        link_bytes_per_cycle: bytes one link carries per cycle in one direction.
        alpha: cycles per hop when routers forward by their static rules.
        beta: cycles per software relay (a core receives, combines and forwards).
        routes_per_core: routing entries (colours) one router can hold.
        power_watts: power of the whole device, for energy estimates.
        call_overhead: fixed cycles a core spends to start one compute call (one vector
            instruction: a GEMV row, or one Mt-long column update of a tile GEMM).
        map_overhead: cycles a core spends setting up one loop of vector instructions over a
            DSD (a ``@map``: a GEMV runs one over its input, a tile GEMM one per row of B).
        task_overhead: cycles a core spends switching to its next task (the CSL activates one
            task per operation: it picks the task, sets up the operation's DSDs and fabric
            queues). Charged once per compute operation and once per phase of a collective.
        sram_read_bytes_per_cycle: bytes one core can read from its SRAM per cycle (the peak
            that utilisation's MBU divides by; not used by the cost rules).
        peak_fmacs_per_cycle: the hardware's peak FMACs per cycle per dtype, for MFU (the cost
            rules use ``fmacs_per_cycle``, a fitted sustained rate); empty: the same as it.
    """

    name: str
    width: int
    height: int
    sram_bytes: int
    clock_hz: float
    fmacs_per_cycle: Mapping[str, float]
    link_bytes_per_cycle: float
    alpha: float
    beta: float
    routes_per_core: int
    power_watts: float
    call_overhead: float = 0.0
    map_overhead: float = 0.0
    task_overhead: float = 0.0
    sram_read_bytes_per_cycle: float = 16.0
    peak_fmacs_per_cycle: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("width", "height", "sram_bytes", "routes_per_core"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise DeviceSpecError(f"device {self.name!r}: field {name!r} must be a positive integer, got {value!r}")
        for name in ("clock_hz", "link_bytes_per_cycle", "power_watts", "sram_read_bytes_per_cycle"):
            _check_number(self.name, name, getattr(self, name), positive=True)
        for name in ("alpha", "beta", "call_overhead", "map_overhead", "task_overhead"):
            _check_number(self.name, name, getattr(self, name), positive=False)
        if not isinstance(self.fmacs_per_cycle, Mapping) or not self.fmacs_per_cycle:
            raise DeviceSpecError(
                f"device {self.name!r}: field 'fmacs_per_cycle' must map dtype names to rates, "
                f"got {self.fmacs_per_cycle!r}"
            )
        for dtype, rate in self.fmacs_per_cycle.items():
            _check_number(self.name, f"fmacs_per_cycle.{dtype}", rate, positive=True)
        object.__setattr__(self, "fmacs_per_cycle", dict(self.fmacs_per_cycle))
        for dtype, rate in self.peak_fmacs_per_cycle.items():
            _check_number(self.name, f"peak_fmacs_per_cycle.{dtype}", rate, positive=True)
        object.__setattr__(self, "peak_fmacs_per_cycle", dict(self.peak_fmacs_per_cycle))

    def rate(self, dtype: str) -> float:
        """Return the FMACs per cycle for ``dtype``.

        Raises:
            DeviceSpecError: the device has no rate for that dtype.
        """
        try:
            return self.fmacs_per_cycle[dtype]
        except KeyError:
            raise DeviceSpecError(
                f"device {self.name!r} has no compute rate for dtype {dtype!r}; "
                f"known: {sorted(self.fmacs_per_cycle)}"
            ) from None

    @property
    def cores(self) -> int:
        """Cores of the whole fabric."""
        return self.width * self.height

    def sram_bandwidth(self, cores: int | None = None) -> float:
        """Aggregate SRAM read bandwidth of ``cores`` cores (default: the whole fabric), bytes/s."""
        return self.sram_read_bytes_per_cycle * (cores or self.cores) * self.clock_hz

    def peak_flops(self, dtype: str, cores: int | None = None) -> float:
        """Peak FLOP/s of ``cores`` cores (default: the whole fabric) in ``dtype``: 2 FLOPs per FMAC.

        Raises:
            DeviceSpecError: no rate for that dtype.
        """
        return 2 * self.peak_fmacs_per_cycle.get(dtype, self.rate(dtype)) * (cores or self.cores) * self.clock_hz

    def seconds(self, cycles: float) -> float:
        """Convert device cycles to seconds."""
        return cycles / self.clock_hz

    def check_mesh(self, height: int, width: int) -> None:
        """Refuse a core mesh that does not fit the fabric.

        Raises:
            DeviceSpecError: a side is not positive or larger than the fabric.
        """
        for axis, size, limit, field_name in (("y", height, self.height, "height"), ("x", width, self.width, "width")):
            if not isinstance(size, int) or size <= 0:
                raise DeviceSpecError(f"mesh size along {axis} must be a positive integer, got {size!r}")
            if size > limit:
                raise DeviceSpecError(
                    f"mesh of {height}x{width} cores does not fit device {self.name!r}: {axis} size {size} > "
                    f"fabric {field_name} {limit}"
                )

    def replace(self, **changes: Any) -> "DeviceSpec":
        """Return a copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise DeviceSpecError(f"unknown device field(s) {sorted(unknown)}; valid: {_field_names()}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_file(cls, path: str | Path) -> "DeviceSpec":
        """Read a device from a TOML or JSON file.

        The file holds any of the fields above; ``base = "wse2"`` starts from a preset
        and changes only the fields given. Without ``base`` every field is required.

        Raises:
            DeviceSpecError: unreadable file, unknown key, missing or invalid field.
        """
        path = Path(path)
        try:
            text = path.read_text()
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (OSError, ValueError) as exc:
            raise DeviceSpecError(f"cannot read device file {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise DeviceSpecError(f"device file {path}: expected a table of fields, got {type(data).__name__}")
        base_name = data.pop("base", None)
        unknown = set(data) - set(_field_names())
        if unknown:
            raise DeviceSpecError(f"device file {path}: unknown key(s) {sorted(unknown)}; valid: {_field_names()}")
        data.setdefault("name", path.stem)
        if base_name is not None:
            return preset(base_name).replace(**data)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise DeviceSpecError(f"device file {path}: missing field(s) {missing} (or give base = \"wse2\")")
        return cls(**data)


def _check_number(device: str, name: str, value: Any, *, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        need = "a positive number" if positive else "a number >= 0"
        raise DeviceSpecError(f"device {device!r}: field {name!r} must be {need}, got {value!r}")


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(DeviceSpec)]


# Figures from the WaferLLM reference digest (sections 1.3, 10). alpha = 1 cycle/hop follows from
# the single-cycle neighbour transfer and the link carries one 32-bit wavelet per cycle. wse2's
# beta, float16 rate, call, map and task overheads are FITTED to the calibration set only
# (LLaMA3-8B decode cycles per layer at 420/540/660, Table 4; LLaMA3-8B prefill cycles per layer
# for a 4096-token prompt at 480/600/720, Table 3; 16K and 32K GEMV, Table 6, on an assumed
# 720x720 grid), every row run with the paper kernel (``llm.calibration``). The values are one
# bounded Gauss-Newton step from beta 11.41, rate 1.767, call 0.11, task 108, map 0, with the
# Jacobian measured by finite differences of real cost-only runs; evaluated again with the
# real protocols every row is within 0.8% (``llm.calibration.PRESET_CYCLES``). Standard errors
# from that Jacobian: beta 10.8 +- 0.7 cycles (a relay through the CE: ramp in, add, ramp out,
# an order of magnitude above a hop, as alpha < beta requires); float16 1.78 +- 0.04 FMACs per
# cycle (a 32-bit datapath doing two f16 lanes, a little below its peak of 2); call 0.4 +- 0.3
# cycles per vector instruction (instructions of a @map issue back to back); map 58 +- 3
# cycles per @map (DSD and loop set-up); task 92 +- 4 cycles per task switch. float32's rate
# (one MAC per cycle on two 32-bit operands) is the paper's statement, not fitted. wse3 is built
# from public figures and WSE-2's fitted constants: no WSE-3 figure is in the calibration set.
_PRESETS: dict[str, DeviceSpec] = {
    "wse2": DeviceSpec(
        name="wse2",
        width=757,  # fabric rectangle the WaferLLM programs compile for
        height=996,
        sram_bytes=48 * 1024,
        clock_hz=1.1e9,
        fmacs_per_cycle={"float16": 1.782, "float32": 1.0},  # float16: fitted
        link_bytes_per_cycle=4.0,  # one 32-bit wavelet per cycle per link
        alpha=1.0,
        beta=10.81,  # fitted
        call_overhead=0.398,  # fitted
        map_overhead=58.36,  # fitted
        task_overhead=91.91,  # fitted
        routes_per_core=24,  # routable colours 0-23
        power_watts=15_000.0,  # 37.5 x a 400 W A100, the ratio behind the paper's energy tables
        # two 64-bit reads per core per cycle (with the 64-bit write: 24 B x 850k cores x 1.1 GHz = the 22 PB/s quoted)
        sram_read_bytes_per_cycle=16.0,
        peak_fmacs_per_cycle={"float16": 2.0, "float32": 1.0},  # one 32-bit MAC per cycle, two float16 lanes
    ),
    "wse3": DeviceSpec(
        name="wse3",
        width=762,  # fabric rectangle the WaferLLM programs compile for on WSE-3
        height=1172,
        sram_bytes=48 * 1024,  # 44 GB / 900k cores is about 48.9 KB
        # Not published. The vendor's figures: 21 PB/s of SRAM bandwidth over 900k cores, against 20 PB/s over
        # 850k for WSE-2 (the paper's 22 PB/s for WSE-2 counts writes too); with the same bytes per core per
        # cycle that is WSE-2's 1.1 GHz x (21/20) x (850/900).
        clock_hz=1.09e9,
        # an eight-wide float16 SIMD unit where WSE-2 has four: WSE-2's fitted float16 rate, doubled
        fmacs_per_cycle={"float16": 3.564, "float32": 1.0},
        link_bytes_per_cycle=4.0,  # "retains the same NoC configuration"
        # the same cores and NoC otherwise: WSE-2's fitted relay and overheads, none of them measured on WSE-3
        alpha=1.0,
        beta=10.81,
        call_overhead=0.398,
        map_overhead=58.36,
        task_overhead=91.91,
        routes_per_core=24,
        # the vendor: "twice the performance in the same power envelope" (CS-3 and CS-2 are both rated 23 kW as
        # systems); on wse2's basis (the paper's 37.5 x an A100) that is the same 15 kW
        power_watts=15_000.0,
        peak_fmacs_per_cycle={"float16": 4.0, "float32": 1.0},
    ),
}

# What each preset's cost constants were fitted to (``devices`` prints it); a preset not here is not calibrated.
CALIBRATION = {
    "wse2": "calibrated: LLaMA3-8B decode and prefill cycles per layer and 16K/32K GEMV (WaferLLM Tables 3, 4, 6)",
}


def preset(name: str) -> DeviceSpec:
    """Return a built-in device by name (``wse2`` or ``wse3``).

    Raises:
        DeviceSpecError: unknown name.
    """
    try:
        return _PRESETS[name]
    except KeyError:
        raise DeviceSpecError(f"unknown device preset {name!r}; presets: {sorted(_PRESETS)}") from None


def resolve(device: "str | Path | DeviceSpec") -> DeviceSpec:
    """Accept a preset name, a TOML/JSON path or a ``DeviceSpec``."""
    if isinstance(device, DeviceSpec):
        return device
    if isinstance(device, Path) or (isinstance(device, str) and device.endswith((".toml", ".json"))):
        return DeviceSpec.from_file(device)
    if isinstance(device, str):
        return preset(device)
    raise TypeError(f"device must be a preset name, a .toml/.json path or a DeviceSpec, got {type(device).__name__}")
