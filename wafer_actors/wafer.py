"""The user's handle on an emulated wafer: start tiles, load tensors, run protocols, read results.

Example::

    from wafer_actors import Wafer, Layout, Spec
    from wafer_actors.collectives import chain_allreduce

    with Wafer((8, 8), device="wse2", tiles=(2, 2), transport="ray") as wafer:
        wafer.load("v", np.ones((8, 8, 16), np.float32), Spec("y", "x", None))
        stats = wafer.run(chain_allreduce, buffer="v", axis="x", op="add")
        print(stats.cycles, wafer.read("v")[0, 0])   # 8.0 everywhere
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .device import DeviceSpec, resolve
from .errors import InvalidArgument, LayoutError, ProtocolError
from .fabric.base import LOAD_BYTES, Transport
from .fabric.local import LocalTransport
from .layout import Layout, Spec, gather, scatter
from .mesh import Mesh, Tiling
from .protocol import Protocol
from .shards import Chunk
from .tile import EXECUTORS
from .transfer import Route, check_routes

_ROUTE_CHECKS: dict[tuple, tuple[tuple[Route, ...], tuple[np.ndarray, list[str]]]] = {}  # per mesh, limit and route set
STAT_KEYS = (
    "core_messages_local", "core_bytes_local", "core_messages_remote", "core_bytes_remote",
    "tile_messages", "tile_bytes", "node_messages", "node_bytes", "steps_fused",
)


@dataclass(frozen=True)
class RunStats:
    """What one protocol run cost.

    Attributes:
        protocol: the protocol's name.
        cycles: predicted device cycles, latest core end minus earliest core start.
        seconds: ``cycles`` at the device clock.
        compute_cycles: compute on the critical path (the path into the core that ends last).
        comm_cycles: the rest of ``cycles``: waiting for the fabric.
        relay_stages: software relay stages on the critical path.
        routes_per_core_max: most routing entries any core needed.
        sram_peak_bytes_max: highest SRAM high-water mark of any core so far.
        counts: messages and bytes: ``core_*_local`` between cores of one tile,
            ``core_*_remote`` between cores of different tiles, ``tile_*`` actor messages,
            ``node_*`` actor messages that crossed cluster nodes, ``steps_fused`` collective
            steps the fused executor ran without messages.
        host_wall_s: host seconds the run took.
        stamps: the moments the protocol noted (``Tile.stamp``), each the latest core's clock then.
        outputs: the tensors ``run(outputs=...)`` read back after the run.
        per_tile: each tile's own statistics (``wall_s``, ``wait_s`` and the counts).
        phases: with tracing on (``Wafer.trace``), the protocol's marks in order: (label, cycles from the run's
            start to the phase's end on the latest core of any tile, compute on that core's critical path so far,
            host seconds from the start to the last tile's mark). ``region_phases``: the same for each region, in
            a run of every region of a wafer of several (``phases`` is then empty).
    """

    protocol: str
    cycles: float
    seconds: float
    start: float
    end: float
    compute_cycles: float
    comm_cycles: float
    relay_stages: int
    routes_per_core_max: int
    sram_peak_bytes_max: int
    counts: dict[str, int]
    host_wall_s: float
    per_tile: list[dict[str, Any]] = field(repr=False)
    phases: list[tuple[str, float, float, float]] = field(default_factory=list, repr=False)
    region_phases: list[list[tuple[str, float, float, float]]] = field(default_factory=list, repr=False)
    stamps: dict[str, float] = field(default_factory=dict, repr=False)
    outputs: dict[str, np.ndarray] = field(default_factory=dict, repr=False)


def _phases(marks: list[list[tuple[str, float, float, float]]], start: float) -> list[tuple[str, float, float, float]]:
    """Every tile marks the same phases; a phase ends when its latest core does (that core's compute with it)."""
    out = []
    for per_tile in zip(*marks):
        label, clock, compute, _ = max(per_tile, key=lambda m: m[1])
        if any(m[0] != label for m in per_tile):
            raise ProtocolError(f"tiles marked different phases: {sorted({m[0] for m in per_tile})}")
        out.append((label, clock - start, compute, max(m[3] for m in per_tile)))
    return out


class Region:
    """A rectangle of a wafer's cores that holds tensors of its own: ``load``, ``alloc``, ``read`` and ``free``
    speak its mesh (its top-left core is ``origin`` on the wafer), and reach only its tiles.

    Get it as ``wafer.regions[i]``; a wafer of one region does the same through its own methods.
    """

    def __init__(self, wafer: "Wafer", index: int):
        self.index = index
        self.origin = wafer.tiling.origins[index]
        self.tiling = wafer.tiling.region_tiling()
        self.mesh = self.tiling.mesh
        self.base = index * wafer.tiling.per_region  # the wafer's number of this region's first tile
        self.cost_only = wafer.cost_only
        self.transport = wafer.transport
        self._tensors: dict[str, tuple[tuple[int, ...], Layout]] = {}

    def _call(self, method: str, args: list[tuple]) -> list[Any]:
        got = self._call_some(method, dict(enumerate(args)))
        return [got[i] for i in range(len(args))]

    def _call_some(self, method: str, args: dict[int, tuple]) -> dict[int, Any]:
        got = self.transport.call_some(method, {self.base + i: a for i, a in args.items()})
        return {i - self.base: v for i, v in got.items()}

    def load(self, name: str, array: np.ndarray, spec: Spec | Layout, *, stacked: bool = False) -> None:
        """Copy ``array`` from the host onto the cores, each core getting its block of ``spec``.

        ``stacked``: the first axis is a stack (layers) the protocols read one entry at a
        time; the tiles keep each entry contiguous (see ``Tile.alloc``).

        Raises:
            LayoutError: the mesh does not divide the split axes.
            CoreMemoryError: a block does not fit a core's SRAM.
        """
        array = np.asarray(array)
        layout = self._layout(spec)
        if self.cost_only:
            return self.alloc(name, array.shape, array.dtype, layout, stacked=stacked)
        self.alloc(name, array.shape, array.dtype, layout, stacked=stacked)
        if stacked and not layout.spec.mesh_axes(0):  # one entry at a time: the host never holds all the blocks
            entry = Layout(layout.mesh, Spec(*layout.spec[1:]))
            parts = [(i, array[i], entry) for i in range(array.shape[0])]
        else:
            parts = [(None, array, layout)]
        r = self.tiling.rects

        # bands of core rows of at most LOAD_BYTES (so is each tile's part): Ray sends such calls inline (see
        # fabric.ray.SYSTEM_CONFIG), and a tile holds a few bands at a time, whatever the tensor
        def bands() -> Iterator[dict[int, tuple]]:
            for index, part, lay in parts:
                blocks = scatter(part, lay)
                rows = max(1, LOAD_BYTES // max(1, blocks[0].nbytes))
                for y in range(0, max(t.y1 - t.y0 for t in r), rows):
                    yield {self.base + i: (name, index, y, blocks[t.y0 + y : min(t.y1, t.y0 + y + rows), t.x0 : t.x1])
                           for i, t in enumerate(r) if t.y0 + y < t.y1}

        self.transport.call_stream("put_part", bands())

    def _scatter(self, name: str, array: np.ndarray, layout: Layout) -> list[np.ndarray]:
        """Each tile's blocks of ``array`` laid out by ``layout`` (recorded as tensor ``name``)."""
        blocks = scatter(array, layout)
        self._tensors[name] = (tuple(array.shape), layout)
        return [blocks[t.y0 : t.y1, t.x0 : t.x1] for t in self.tiling.rects]

    def load_chunks(self, name: str, shape: Sequence[int], spec: Spec | Layout, parts: Sequence[tuple[str, Chunk]]) -> int:
        """Each tile reads its blocks of tensor ``name`` (of ``shape``, laid out by ``spec``) from its shard file:
        ``parts[i]`` is tile i's (path, chunk); see ``shards``. Nothing passes through the host. Returns the bytes read.

        Raises:
            LayoutError: a chunk's blocks are not what ``spec`` gives this wafer's cores.
            ShardError: a file is missing (on a tile's node), truncated or corrupted.
        """
        layout = self._layout(spec)
        block = layout.block_shape(shape)
        if len(parts) != len(self.tiling):
            raise LayoutError(f"{name!r}: {len(parts)} shard chunks for {len(self.tiling)} tiles")
        for i, (path, chunk) in enumerate(parts):
            if chunk.name != name or chunk.block != block:
                raise LayoutError(f"{path}: chunk {chunk.name!r} holds blocks {chunk.block}; tensor {name!r} of shape "
                                  f"{tuple(shape)} has blocks {block} on this region's {self.mesh.height}x{self.mesh.width} cores")
        read = self._call("load_chunk", [tuple(p) for p in parts])
        self._tensors[name] = (tuple(int(s) for s in shape), layout)
        return int(sum(read))

    def alloc(self, name: str, shape: Sequence[int], dtype: Any, spec: Spec | Layout, *, stacked: bool = False) -> None:
        """Allocate a zero tensor of ``shape`` laid out by ``spec`` (shape only when cost-only; ``stacked`` as in ``load``)."""
        layout = self._layout(spec)
        block = layout.block_shape(shape)
        self._call("alloc", [(name, block, np.dtype(dtype).str, None, stacked)] * len(self.tiling))
        self._tensors[name] = (tuple(int(s) for s in shape), layout)

    def read(self, name: str) -> np.ndarray:
        """Copy tensor ``name`` back to the host (the copy on core index 0 of replicated axes)."""
        return self._gather(name, self._call_some("get", self._reads(name)))

    def _reads(self, name: str) -> dict[int, tuple]:
        """The ``Tile.get`` arguments, per tile, that bring tensor ``name`` back: only the copy at index 0 of each
        replicated mesh axis travels to the host."""
        if name not in self._tensors:
            raise KeyError(f"no tensor {name!r} on the region; tensors: {sorted(self._tensors)}")
        if self.cost_only:
            raise InvalidArgument("a cost-only wafer holds shapes, not values; nothing to read")
        replicated = self._tensors[name][1].replicated_axes()
        first = lambda axis: (0, 1) if axis in replicated else None  # noqa: E731
        return {i: (name, first("y"), first("x")) for i, t in enumerate(self.tiling.rects)
                if ("y" not in replicated or t.y0 == 0) and ("x" not in replicated or t.x0 == 0)}

    def _gather(self, name: str, parts: dict[int, np.ndarray]) -> np.ndarray:
        """Tensor ``name`` from the blocks ``_reads`` brought back."""
        shape, layout = self._tensors[name]
        replicated = layout.replicated_axes()
        first = next(iter(parts.values()))
        out_shape = tuple(1 if a in replicated else n for a, n in zip("yx", self.mesh.shape))
        blocks = np.empty(out_shape + first.shape[2:], dtype=first.dtype)
        for i, p in parts.items():
            t = self.tiling.rects[i]
            blocks[t.y0 : t.y0 + p.shape[0], t.x0 : t.x0 + p.shape[1]] = p
        return gather(blocks, layout, shape)

    def blocks(self, name: str) -> np.ndarray:
        """Every core's block of ``name`` as ``[height, width, *block]``, replicated copies included."""
        if self.cost_only:
            raise InvalidArgument("a cost-only wafer holds shapes, not values; nothing to read")
        parts = self._call_some("get", {i: (name, None, None) for i in range(len(self.tiling.rects))})
        first = next(iter(parts.values()))
        out = np.empty(self.mesh.shape + first.shape[2:], dtype=first.dtype)
        for i, p in parts.items():
            t = self.tiling.rects[i]
            out[t.y0 : t.y1, t.x0 : t.x1] = p
        return out

    def free(self, name: str) -> None:
        """Release tensor ``name`` on every core."""
        self._call("free", [(name,)] * len(self.tiling))
        self._tensors.pop(name, None)

    def _layout(self, spec: Spec | Layout) -> Layout:
        if isinstance(spec, Layout):
            if spec.mesh != self.mesh:
                raise LayoutError(f"{spec!r} is for another mesh than this region's {self.mesh!r}")
            return spec
        return Layout(self.mesh, spec if isinstance(spec, Spec) else Spec(*spec))

    def memory(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-core SRAM bytes of this region (in use, high-water), each ``[y, x]``."""
        parts = self._call("memory", [()] * len(self.tiling))
        return _assemble(self.tiling, [p[0] for p in parts]), _assemble(self.tiling, [p[1] for p in parts])


class Wafer:
    """An emulated core mesh spread over tiles.

    Args:
        mesh: ``(height, width)`` in cores, or a ``Mesh``.
        device: preset name (``wse2``, ``wse3``), a TOML/JSON file or a ``DeviceSpec``.
        tiles: ``(rows, cols)`` of tiles; each tile is one actor.
        transport: ``"local"`` (in-process), ``"ray"`` (actors on the current Ray cluster,
            started locally if none) or a ``Transport``.
        cost_only: keep shapes but no tensors: same protocols and cycles, no numerics.
        executor: ``fused`` (default) runs collectives as compiled loops over each tile's
            cores and batches what crosses tile edges; ``step`` runs every protocol step by
            step (the specification). Both give bit-identical values and cycles.
        region, origins: the wafer holds equal regions of ``region`` cores whose top-left
            cores are ``origins`` (``regions``), each split into ``tiles``; cores of no region
            stay idle. By default the whole mesh is one region. All share one fabric and one
            clock per core: a protocol moves data between regions as transfers like any other.

    Raises:
        DeviceSpecError: the mesh does not fit the device.
        ValueError: bad tile counts, transport name, or regions that overlap or leave the mesh.
    """

    def __init__(
        self,
        mesh: tuple[int, int] | Mesh,
        *,
        device: str | Path | DeviceSpec = "wse2",
        tiles: tuple[int, int] = (1, 1),
        transport: str | Transport = "local",
        cost_only: bool = False,
        executor: str = "fused",
        region: tuple[int, int] | None = None,
        origins: Sequence[tuple[int, int]] = ((0, 0),),
    ):
        if executor not in EXECUTORS:
            raise InvalidArgument(f"executor must be one of {EXECUTORS}, got {executor!r}")
        self.device = resolve(device)
        if not isinstance(mesh, Mesh):
            if len(mesh) != 2:
                raise InvalidArgument(f"mesh must be (height, width), got {mesh!r}")
            self.device.check_mesh(*mesh)
            mesh = Mesh(*mesh)
        self.device.check_mesh(mesh.height, mesh.width)
        self.mesh = mesh
        self.tiling = Tiling(mesh, tuple(tiles), region, tuple(origins))
        self.cost_only = bool(cost_only)
        self.executor = executor
        self.transport = _make_transport(transport)
        self.transport.spawn(self.tiling, self.device, self.cost_only, executor)
        self.regions = [Region(self, i) for i in range(len(self.tiling.origins))]
        self._run_id = 0
        self._tracing = (False, False)

    # ---- tensors (a wafer of one region; see ``Region``) -------------------------------------
    def _only(self) -> Region:
        if len(self.regions) > 1:
            raise InvalidArgument(f"this wafer holds {len(self.regions)} regions: place tensors through wafer.regions[i]")
        return self.regions[0]

    def load(self, name: str, array: np.ndarray, spec: Spec | Layout, *, stacked: bool = False) -> None:
        """As ``Region.load`` on the wafer's one region."""
        self._only().load(name, array, spec, stacked=stacked)

    def load_chunks(self, name: str, shape: Sequence[int], spec: Spec | Layout, parts: Sequence[tuple[str, Chunk]]) -> int:
        """As ``Region.load_chunks`` on the wafer's one region."""
        return self._only().load_chunks(name, shape, spec, parts)

    def alloc(self, name: str, shape: Sequence[int], dtype: Any, spec: Spec | Layout, *, stacked: bool = False) -> None:
        """As ``Region.alloc`` on the wafer's one region."""
        self._only().alloc(name, shape, dtype, spec, stacked=stacked)

    def read(self, name: str) -> np.ndarray:
        """As ``Region.read`` on the wafer's one region."""
        return self._only().read(name)

    def blocks(self, name: str) -> np.ndarray:
        """As ``Region.blocks`` on the wafer's one region."""
        return self._only().blocks(name)

    def free(self, name: str) -> None:
        """As ``Region.free`` on the wafer's one region."""
        self._only().free(name)

    # ---- protocols ------------------------------------------------------------------------
    def run(self, proto: Protocol, *, inputs: dict[str, tuple[np.ndarray, Spec | Layout]] | None = None,
            outputs: Sequence[str] = (), reset: bool = False, region: int | None = None, **kwargs: Any) -> RunStats:
        """Run ``proto`` on every tile and return what it cost.

        Routes are counted before anything runs (once per set of routes: a protocol that
        returns the same cached ``Route`` objects is not counted again). The host's part
        travels with the run, one call per tile: ``inputs`` are loaded first (as ``load``,
        name -> (array, spec)), ``reset`` zeroes the clocks first (``reset_clocks``), and the
        tensors named in ``outputs`` come back in ``RunStats.outputs`` (as ``read``). On a wafer of
        several regions, the inputs go to the first region and the outputs come from the last.

        ``region``: run a protocol of one region on that region alone (its mesh, its routes, its
        inputs and outputs; the other tiles wait); the figures are the region's.

        Raises:
            RoutingError: a core needs more routing entries than the device has.
            CoreMemoryError, ProtocolError: raised by a tile; the other tiles are stopped.
        """
        if not isinstance(proto, Protocol):
            raise TypeError(f"run() takes a Protocol (see wafer_actors.collectives), got {type(proto).__name__}")
        if region is not None and not 0 <= region < len(self.regions):
            raise InvalidArgument(f"region must be in [0, {len(self.regions)}), got {region}")
        where = None if region is None else self.regions[region]
        mesh = self.mesh if where is None else where.mesh
        usage, routes = self._check_routes(mesh, proto.routes(mesh, **kwargs))
        if self.cost_only and (inputs or outputs):
            raise InvalidArgument("a cost-only wafer holds shapes, not values: a run takes no inputs or outputs")
        io = [{"reset": reset, "put": {}, "get": {}} for _ in self.tiling.rects]
        if where is not None:
            for i in range(len(io)):
                io[i]["skip"] = not where.base <= i < where.base + len(where.tiling)
        into, out_of = (self.regions[0], self.regions[-1]) if where is None else (where, where)
        for name, (array, spec) in (inputs or {}).items():
            for i, part in enumerate(into._scatter(name, np.asarray(array), into._layout(spec))):
                io[into.base + i]["put"][name] = part
        for name in outputs:
            for i, args in out_of._reads(name).items():
                io[out_of.base + i]["get"][name] = args[1:]
        self._run_id += 1
        t0 = time.perf_counter()
        results = self.transport.run(proto.path, self._run_id, routes, kwargs, io)
        wall = time.perf_counter() - t0
        ran = [r for r, part in zip(results, io) if not part.get("skip")]
        regions: dict[int, list] = {}  # region -> marks of each of its tiles that ran
        for i, (r, part) in enumerate(zip(results, io)):
            if not part.get("skip"):
                regions.setdefault(i // self.tiling.per_region, []).append(r["marks"])
        start = min(r["start"] for r in ran)
        last = min(ran, key=lambda r: (-r["end"], r["last_core"]))  # tiling-independent choice
        end = last["end"]
        counts = {k: int(sum(r["stats"].get(k, 0) for r in ran)) for k in STAT_KEYS}
        return RunStats(
            protocol=proto.name,
            cycles=end - start,
            seconds=self.device.seconds(end - start),
            start=start,
            end=end,
            compute_cycles=min(last["compute_cycles"], end - start),
            comm_cycles=end - start - min(last["compute_cycles"], end - start),
            relay_stages=last["relay_stages"],
            routes_per_core_max=int(usage.max()),
            sram_peak_bytes_max=max(r["sram_high"] for r in ran),
            counts=counts,
            host_wall_s=wall,
            per_tile=[r["stats"] for r in ran],
            phases=_phases([r["marks"] for r in ran], start) if len(regions) == 1 else [],
            region_phases=[] if len(regions) == 1 else [_phases(m, start) for m in regions.values()],
            stamps={k: max(r["stamps"][k] for r in ran if k in r["stamps"]) for k in {k for r in ran for k in r["stamps"]}},
            outputs={name: out_of._gather(name, {i - out_of.base: r["got"][name] for i, r in enumerate(results)
                                                if name in r.get("got", {})}) for name in outputs},
        )

    def activity(self) -> tuple[np.ndarray, np.ndarray]:
        """With ``trace(activity=True)``: compute cycles charged to each core ``[y, x]`` and bytes sent on each
        directed link ``[4, y, x]`` (the links leaving core (y, x) toward N, S, W, E), over every run since."""
        parts = self.transport.call("activity", [()] * len(self.tiling))
        links = np.stack([self._assemble([p[1][k] for p in parts]) for k in range(4)])
        return self._assemble([p[0] for p in parts]), links

    def trace(self, on: bool = True, activity: bool = False) -> None:
        """Record the phases of every protocol run from now on (``RunStats.phases``), and with ``activity`` what
        ``activity`` returns (each send then costs the host a pass over the mesh)."""
        self._tracing = (on, activity)
        self.transport.call("set_tracing", [(on, activity)] * len(self.tiling))

    def _check_routes(self, mesh: Mesh, routes: Iterable[Route]) -> tuple[np.ndarray, list[str]]:
        if not isinstance(routes, (list, tuple)):  # yielded lazily (each built anew): counted as they come, failing early
            return check_routes(mesh, routes, self.device.routes_per_core)
        key = (mesh, self.device.routes_per_core, tuple(map(id, routes)))  # the entry holds the routes: ids stay theirs
        hit = _ROUTE_CHECKS.get(key)
        if hit is None:
            if len(_ROUTE_CHECKS) >= 64:  # protocols that build new routes every run
                _ROUTE_CHECKS.clear()
            hit = _ROUTE_CHECKS[key] = (routes, check_routes(mesh, routes, self.device.routes_per_core))
        return hit[1]

    # ---- state ----------------------------------------------------------------------------
    def clocks(self) -> np.ndarray:
        """Per-core virtual clocks, ``[y, x]`` in cycles."""
        return self._assemble(self.transport.call("clocks", [()] * len(self.tiling)))

    def reset_clocks(self) -> None:
        """Set every core's clock to zero (a fresh launch on the device)."""
        self.transport.call("reset_clocks", [()] * len(self.tiling))

    def snapshot(self, skip: list[str]) -> list[dict[str, Any]]:
        """Every tile's state on the host (its buffers but ``skip``, clocks, SRAM accounting), for ``restore``."""
        return self.transport.call("export_state", [(skip, True)] * len(self.tiling))

    def restore(self, states: list[dict[str, Any]]) -> None:
        """Put back the tiles' state from ``snapshot`` (on tiles whose ``skip`` buffers are in place already)."""
        self.transport.call("import_state", [(s,) for s in states])

    def memory(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-core SRAM bytes (in use, high-water), each ``[y, x]``."""
        parts = self.transport.call("memory", [()] * len(self.tiling))
        return self._assemble([p[0] for p in parts]), self._assemble([p[1] for p in parts])

    def nodes(self) -> list[str]:
        """The cluster node of each tile."""
        return self.transport.nodes()

    def move_start(self, tiles: list[int], node: str, keep: list[str]) -> Any:
        """Start moving ``tiles`` to the Ray node ``node``: new actors there receive the tiles' buffers in the
        background while runs go on; ``move_finish`` completes it with what changed since, except in ``keep``
        (buffers no protocol writes, such as weights).

        Raises:
            InvalidArgument: in-process tiles, a tile index out of range, or a node that is not alive.
        """
        from .fabric.ray import RayTransport

        if not isinstance(self.transport, RayTransport):
            raise InvalidArgument("moving tiles needs Ray tiles (transport='ray'); this wafer's tiles are in-process")
        bad = [t for t in tiles if not 0 <= t < len(self.tiling)]
        if bad or not tiles:
            raise InvalidArgument(f"tiles to move must be indices in [0, {len(self.tiling)}), got {list(tiles)}")
        import ray

        alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        if node not in alive:
            raise InvalidArgument(f"node {node!r} is not an alive Ray node; alive: {', '.join(alive)}")
        return self.transport.move_start(list(tiles), node, list(keep))

    def move_cancel(self, move: Any) -> None:
        """Drop a move under way (its new actors stop; the tiles stay where they are)."""
        self.transport.move_cancel(move)

    def move_ready(self, move: Any) -> bool:
        """Whether a move's background copies are done (``move_finish`` then pauses only for the rest)."""
        return self.transport.move_ready(move)

    def move_finish(self, move: Any) -> None:
        """Complete a move between runs: what changed in each tile's buffers since the background copy, and its
        clocks and SRAM accounting, are copied; the new actors take over and the old ones stop."""
        self.transport.move_finish(move)
        if any(self._tracing):  # the new actors trace as the old ones did
            self.trace(*self._tracing)

    def _assemble(self, parts: list[np.ndarray]) -> np.ndarray:
        return _assemble(self.tiling, parts)

    def shutdown(self) -> None:
        """Stop the tiles."""
        self.transport.shutdown()

    def __enter__(self) -> "Wafer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _assemble(tiling: Tiling, parts: list[np.ndarray]) -> np.ndarray:
    """One array over ``tiling``'s mesh from each tile's part (zero on cores of no tile)."""
    out = np.zeros(tiling.mesh.shape, dtype=parts[0].dtype)
    for t, p in zip(tiling.rects, parts):
        out[t.y0 : t.y1, t.x0 : t.x1] = p
    return out


def _make_transport(transport: str | Transport) -> Transport:
    if isinstance(transport, Transport):
        return transport
    if transport == "local":
        return LocalTransport()
    if transport == "ray":
        from .fabric.ray import RayTransport

        return RayTransport()
    raise InvalidArgument(f"transport must be 'local', 'ray' or a Transport, got {transport!r}")
