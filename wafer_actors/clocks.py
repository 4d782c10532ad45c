"""A tile's clocks: every core's virtual time, the compute it is charged, and what tracing records.

``Clocks`` is the part of ``Tile`` that holds the per-core timing state the PLMR rules
advance (``timing`` has the rules; both executors use them through these arrays), charges
compute and task switches, and records marks and activity when asked. It reads the tile's
``device`` and ``costs`` and owns the arrays below.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .device import DeviceSpec
from .mesh import TileRect
from .timing import Costs


class Clocks:
    """Per-core clocks, compute charges and traces of a tile's cores (a part of ``Tile``)."""

    rect: TileRect  # the tile's, read here
    device: DeviceSpec
    costs: Costs

    def __init__(self) -> None:
        shape = self.rect.shape
        self.clock = np.zeros(shape)  # cycles, per core
        self.fwd_head = np.zeros(shape)  # cycle a streaming relay may start forwarding
        self.relaying = np.zeros(shape, dtype=bool)  # took a stream it has not forwarded yet
        self.sent = np.zeros(shape)  # cycle the core's last send has fully landed
        self.stages = np.zeros(shape, dtype=np.int64)  # relay stages on the critical path (this run)
        self.path_compute = np.zeros(shape)  # compute cycles on the critical path (this run)
        # flat views of the six, made once (the arrays are only ever written in place)
        self._flat = tuple(a.reshape(-1) for a in (self.clock, self.fwd_head, self.relaying, self.sent, self.stages,
                                                   self.path_compute))
        n = self.clock.size  # per-core accumulators of one receive step (left empty between steps)
        self.acc = (np.full(n, -np.inf), np.full(n, -np.inf), np.zeros(n), np.zeros(n, dtype=np.int64), np.zeros(n))
        self.tracing = False  # record protocols' marks
        self.counting = False  # record per-core compute cycles and per-link bytes
        self.marks: list[tuple[str, float, float, float]] = []
        self.stamps: dict[str, float] = {}  # this run's moments by name: the latest core's clock then
        self.busy = np.zeros(shape)  # compute cycles charged to each core while counting
        self.link_bytes = np.zeros((4, *shape))  # bytes sent on each directed link leaving a core (N, S, W, E)
        self._rates: dict[Any, float] = {}

    def set_tracing(self, marks: bool, activity: bool) -> None:
        self.tracing, self.counting = bool(marks), bool(activity)

    def activity(self) -> tuple[np.ndarray, np.ndarray]:
        """What counting recorded: compute cycles per core ``[y, x]`` and bytes per directed link ``[4, y, x]``."""
        return self.busy.copy(), self.link_bytes.copy()

    def mark(self, label: str) -> None:
        """End of a phase of the running protocol, when tracing: the latest core's clock, the compute on its
        critical path so far, and the host time since the run started. A label that starts with ``.`` ends a
        part of the next phase (a step of a GEMM inside an operation)."""
        if self.tracing:
            i = int(np.argmax(self.clock))
            self.marks.append((label, float(self.clock.flat[i]), float(self.path_compute.flat[i]), time.perf_counter()))

    def stamp(self, name: str) -> None:
        """Note the moment ``name`` of the running protocol (traced or not): the latest clock of the tile's cores."""
        self.stamps[name] = float(self.clock.max())

    def clocks(self) -> np.ndarray:
        return self.clock.copy()

    def flat_clocks(self) -> tuple[np.ndarray, ...]:
        """The per-core timing state as flat views: clock, fwd_head, relaying, sent, stages, path_compute."""
        return self._flat

    def reset_clocks(self) -> None:
        self.clock[...] = 0.0
        self.fwd_head[...] = 0.0
        self.relaying[...] = False
        self.sent[...] = 0.0

    def charge(self, fmacs: float | np.ndarray, dtype: str, cores: np.ndarray | None = None, calls: int = 1,
               maps: int = 0) -> None:
        """Advance the clocks of ``cores`` (local mask; default all) by one task: ``fmacs`` FMACs issued as
        ``calls`` vector instructions from ``maps`` loops over a DSD (a GEMV's one, a GEMM step's one per row of B)."""
        self.charge_cycles(self.task_cycles(fmacs, dtype, calls, maps), cores)

    def charge_cycles(self, cycles: float | np.ndarray, cores: np.ndarray | None = None) -> None:
        """``charge`` a task whose cycles (``task_cycles``) are known: a task every layer repeats is costed once."""
        if cores is None:  # every core: no mask to build or apply
            self.clock += cycles
            self.path_compute += cycles
            if self.counting:
                self.busy += cycles
            return
        add = cycles if np.ndim(cycles) == 0 else cycles[cores]
        self.clock[cores] += add
        self.path_compute[cores] += add
        if self.counting:
            self.busy[cores] += add

    def task_cycles(self, fmacs: float | np.ndarray, dtype: str, calls: int = 1, maps: int = 0) -> float | np.ndarray:
        """Cycles of one task (see ``charge``)."""
        return self.costs.compute(fmacs, self.rate(dtype), calls, maps)

    def switch_tasks(self, n: int) -> None:
        """Charge every core ``n`` task switches: the tasks of a collective's phases, set up one after another."""
        cycles = n * self.costs.task_overhead
        self.clock += cycles
        self.path_compute += cycles
        if self.counting:
            self.busy += cycles

    def rate(self, dtype: Any) -> float:
        """FMACs per cycle for ``dtype`` (memoised: dtype names are slow to build)."""
        rate = self._rates.get(dtype)
        if rate is None:
            rate = self._rates[dtype] = self.device.rate(np.dtype(dtype).name)
        return rate
