"""One tile: a rectangle of cores run by one actor.

Core is the unit of meaning, tile the unit of execution: every per-core quantity
(buffers, SRAM in use, virtual clock) is an array whose leading axes are the tile's rows
and columns, and every operation is vectorised over them.

How messages are timed (PLMR costs, streaming relays, ``Sendrecv``, critical-path
records) is in ``timing``, the one place both executors use: ``step`` sends and receives
step by step, ``fused`` runs a collective whose flows stay inside the tile as one compiled
loop (``program``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numba
import numpy as np

from .device import DeviceSpec
from .errors import CoreMemoryError, ProtocolAborted, ProtocolError
from .fabric.wire import Message, decode, encode
from .mesh import Mesh, Tiling
from .program import Fused, Program
from .protocol import resolve
from .shards import Chunk, read_chunk
from .timing import Costs, arrive, receive_one, receive_one_split, send_flows, send_flows_split, settle
from .transfer import Transfer

OPS = ("store", "add", "max")
EXECUTORS = ("fused", "step")
LOCAL_PARTS_BUDGET = 4_000_000  # flows of cached transfer parts per tile (about 150 MB of index arrays)
FUSED_CACHE = 64  # flattened programs kept per tile
SPLIT_FLOWS = 20_000  # a local transfer with this many flows is timed on parallel threads
_STATE = ("clock", "fwd_head", "relaying", "sent", "stages", "path_compute", "used", "high")  # per-core arrays a move copies


@dataclass
class Buffer:
    """A named per-core buffer: every charged core holds a block of ``block`` shape."""

    block: tuple[int, ...]
    dtype: np.dtype
    cores: np.ndarray  # bool [h, w]: cores charged for (and meant to hold) the block
    data: np.ndarray | None  # [h, w, *block]; None in cost-only runs
    alias: bool = False  # a name for part of another buffer: shares its memory, charges nothing

    @property
    def nbytes(self) -> int:
        """Bytes of one core's block."""
        return math.prod(self.block) * self.dtype.itemsize


def _stacked(b: Buffer) -> bool:
    """Whether ``b`` was allocated stacked (each entry of its first block axis contiguous over the cores)."""
    return (b.data is not None and b.data.ndim > 2 and not b.data.flags.c_contiguous
            and np.moveaxis(b.data, 2, 0).flags.c_contiguous)


def _entry_bytes(a: np.ndarray) -> np.ndarray:
    """The bytes of each entry of ``[h, w, *block]`` data (a block's last axis, or a core's scalar), along the last
    axis: entries compare by their bits (-0.0, NaN)."""
    return np.ascontiguousarray(a if a.ndim > 2 else a[..., None]).view(np.uint8)


def _span(fi: np.ndarray) -> slice | None:
    """``fi`` as a slice when it is a run of consecutive cores (then blocks move without an index array)."""
    if len(fi) and fi[-1] - fi[0] == len(fi) - 1 and bool((np.diff(fi) == 1).all()):
        return slice(int(fi[0]), int(fi[-1]) + 1)
    return None


def _combine(buf: Buffer, fi: np.ndarray | slice, incoming: np.ndarray, op: str) -> None:
    """Write (or add, or max) received blocks into the cores ``fi`` (flat local indices, distinct; or a slice) of ``buf``."""
    if incoming.shape[1:] != buf.block:
        raise ProtocolError(f"received blocks of shape {incoming.shape[1:]} into a buffer with blocks {buf.block}")
    if buf.alias:  # a strided view (one layer of a stack): index it by (row, column), never through a copy
        if isinstance(fi, slice):
            fi = np.arange(fi.start, fi.stop)
        flat, fi = buf.data, np.unravel_index(fi, buf.data.shape[:2])
    else:
        flat = buf.data.reshape((-1,) + buf.block)
    if op == "store":
        flat[fi] = incoming
    elif op == "add":
        flat[fi] += incoming
    else:
        flat[fi] = np.maximum(flat[fi], incoming)


@dataclass(frozen=True)
class _Local:
    """A transfer part in this tile's flat core indices (cached per transfer, peer and direction)."""

    fi: np.ndarray  # per flow: flat index of the local source (outgoing) or destination (incoming) core
    fi_src: np.ndarray  # outgoing: flat index of each distinct source, in message order; incoming: per flow, its block in the message
    load: np.ndarray
    latency_hops: np.ndarray
    relays: np.ndarray
    span: slice | None = None  # incoming: ``fi`` as a slice when the cores are consecutive
    in_order: bool = False  # incoming: the message's blocks are already in flow order (no multicast)


class Tile:
    """The cores ``tiling.rects[index]`` of a mesh, with their buffers, clocks and mailbox.

    The same class runs in-process (``fabric.local``) and as a Ray actor (``fabric.ray``);
    a transport gives it ``post(dest_tile, raw_bytes)`` to reach other tiles. ``executor``
    says how ``exchange`` runs a collective (``step`` or ``fused``; see ``program``).
    """

    def __init__(self, index: int, mesh_shape: tuple[int, int], tiles: tuple[int, int], device: DeviceSpec, cost_only: bool,
                 executor: str = "fused"):
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
        self.tiling = Tiling(Mesh(*mesh_shape), tiles)
        self.rect = self.tiling.rects[index]
        self.index = index
        self.device = device
        self.costs = Costs.of(device)
        self.cost_only = cost_only
        self.executor = executor
        shape = self.rect.shape
        self.clock = np.zeros(shape)  # cycles, per core
        self.fwd_head = np.zeros(shape)  # cycle a streaming relay may start forwarding
        self.relaying = np.zeros(shape, dtype=bool)  # took a stream it has not forwarded yet
        self.sent = np.zeros(shape)  # cycle the core's last send has fully landed
        self.stages = np.zeros(shape, dtype=np.int64)  # relay stages on the critical path (this run)
        self.path_compute = np.zeros(shape)  # compute cycles on the critical path (this run)
        n = self.clock.size  # per-core accumulators of one receive step (left empty between steps)
        self.acc = (np.full(n, -np.inf), np.full(n, -np.inf), np.zeros(n), np.zeros(n, dtype=np.int64), np.zeros(n))
        self.used = np.zeros(shape, dtype=np.int64)  # SRAM bytes in use
        self.high = np.zeros(shape, dtype=np.int64)  # SRAM high-water mark
        self.buffers: dict[str, Buffer] = {}
        self.stats: Counter = Counter()
        self.post: Callable[[int, bytes], None] | None = None
        self.nodes: list[str] = []
        self._mail: dict[tuple[int, str, int], asyncio.Future] = {}
        self._waiting: tuple[str, int, asyncio.Future] | None = None  # the receive the run is blocked in
        self._run_id = -1
        self._aborted_run = -1
        self._routes: frozenset[str] = frozenset()
        self._sent: Counter = Counter()
        self._received: Counter = Counter()
        self._rates: dict[Any, float] = {}
        self._local_size = 0  # flows held in _local_parts
        self._local_parts: dict[tuple[str, str], tuple[Transfer, dict[int, _Local]]] = {}
        self._fused: dict[str, tuple[Program, Fused]] = {}
        self._baseline: dict[str, np.ndarray] = {}  # mutable buffers as last sent by export_buffers
        self.tracing = False  # record protocols' marks
        self.counting = False  # record per-core compute cycles and per-link bytes
        self._marks: list[tuple[str, float, float, float]] = []
        self.busy = np.zeros(shape)  # compute cycles charged to each core while counting
        self.link_bytes = np.zeros((4, *shape))  # bytes sent on each directed link leaving a core (N, S, W, E)
        self._program_links: dict[str, np.ndarray] = {}  # a program's streams per link of this tile, per block byte

    # ---- wiring ---------------------------------------------------------------------------
    def connect(self, post: Callable[[int, bytes], None], nodes: list[str]) -> None:
        """Give the tile a way to reach other tiles and the node each tile runs on."""
        self.post, self.nodes = post, list(nodes)

    # ---- memory ---------------------------------------------------------------------------
    def alloc(self, name: str, block: tuple[int, ...], dtype: str, cores: np.ndarray | None = None, stacked: bool = False) -> None:
        """Allocate a zeroed block on each core (or the cores in the local mask ``cores``).

        ``stacked``: the block's first axis indexes a stack (layers); each of its entries is
        kept contiguous over the tile's cores, so a per-layer kernel reads one sweep of memory.
        The buffer still reads as ``[h, w, *block]``.

        Raises:
            CoreMemoryError: a core would exceed its SRAM budget; nothing is changed.
        """
        dtype = np.dtype(dtype)
        block = tuple(int(b) for b in block)
        mask = np.ones(self.rect.shape, dtype=bool) if cores is None else np.asarray(cores, dtype=bool)
        buf = Buffer(block, dtype, mask, None)
        old = self.buffers.get(name)
        used = self.used - (old.nbytes * old.cores if old and not old.alias else 0)
        after = used + buf.nbytes * mask
        over = np.argwhere(after > self.device.sram_bytes)
        if len(over):
            y, x = (int(v) for v in over[0])
            raise CoreMemoryError((self.rect.y0 + y, self.rect.x0 + x), name, buf.nbytes, int(used[y, x]), self.device.sram_bytes)
        if not self.cost_only:
            if stacked and block:
                buf.data = np.moveaxis(np.zeros(block[:1] + self.rect.shape + block[1:], dtype=dtype), 0, 2)
            else:
                buf.data = np.zeros(self.rect.shape + block, dtype=dtype)
        self.buffers[name] = buf
        self.used = after
        np.maximum(self.high, self.used, out=self.high)

    def put(self, name: str, blocks: np.ndarray, stacked: bool = False) -> None:
        """Store host data ``[h, w, *block]`` in buffer ``name`` (the host's memcpy to the cores)."""
        blocks = np.asarray(blocks)
        if blocks.shape[:2] != self.rect.shape:
            raise ValueError(f"tile {self.index}: blocks of shape {blocks.shape} do not cover the tile's {self.rect.shape} cores")
        self.alloc(name, blocks.shape[2:], blocks.dtype.str, stacked=stacked)
        if not self.cost_only:
            self.buffers[name].data[...] = blocks

    def put_entry(self, name: str, index: int, blocks: np.ndarray) -> None:
        """Store host data ``[h, w, *entry]`` as entry ``index`` of the stacked buffer ``name``."""
        buf = self.buffer(name)
        if blocks.shape != self.rect.shape + buf.block[1:]:
            raise ValueError(f"tile {self.index}: blocks of shape {blocks.shape} are not entries of {name!r} "
                             f"({self.rect.shape + buf.block[1:]})")
        if not self.cost_only:
            buf.data[:, :, index] = blocks

    def load_chunk(self, path: str, chunk: Chunk) -> int:
        """Allocate buffer ``chunk.name`` and read its blocks from the shard file ``path`` on this tile's node
        (``shards``); return the bytes read.

        Raises:
            ShardError: the file is missing, truncated or corrupted.
            CoreMemoryError: the buffer does not fit.
        """
        self.alloc(chunk.name, chunk.block, chunk.dtype, stacked=chunk.stacked)
        buf = self.buffers[chunk.name]
        if not self.cost_only:
            read_chunk(path, chunk, np.moveaxis(buf.data, 2, 0) if chunk.stacked and chunk.block else buf.data)
        return chunk.nbytes

    def get(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> np.ndarray:
        """Return buffer ``name`` as ``[h, w, *block]``, or only the local ``rows`` / ``cols`` ranges."""
        data = self.data(name)
        if rows is not None:
            data = data[rows[0] : rows[1]]
        if cols is not None:
            data = data[:, cols[0] : cols[1]]
        return data

    def alias(self, name: str, of: str, index: tuple) -> None:
        """Name the part ``index`` of every block of ``of`` (one layer of stacked weights, a range of columns) ``name``.

        The alias shares ``of``'s memory and charges none.
        """
        if name in self.buffers and not self.buffers[name].alias:
            raise ProtocolError(f"tile {self.index}: cannot alias {name!r}: a buffer of that name exists")
        src = self.buffer(of)
        block = np.broadcast_to(np.zeros((), dtype=np.int8), src.block)[index].shape
        data = None if src.data is None else src.data[(slice(None), slice(None), *index)]
        self.buffers[name] = Buffer(block, src.dtype, src.cores, data, alias=True)

    def free(self, name: str) -> None:
        """Release buffer ``name`` (an alias only drops its name)."""
        buf = self.buffer(name)
        if not buf.alias:
            self.used = self.used - buf.nbytes * buf.cores
        del self.buffers[name]

    def memory(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (bytes in use, high-water bytes), per core."""
        return self.used.copy(), self.high.copy()

    def data(self, name: str) -> np.ndarray:
        """Return the data of buffer ``name``: ``[h, w, *block]``."""
        buf = self.buffer(name)
        if buf.data is None:
            raise ProtocolError(f"buffer {name!r} has no data: this wafer runs cost-only (shapes, no tensors)")
        return buf.data

    def buffer(self, name: str) -> Buffer:
        """Return the buffer ``name`` (its block shape, dtype and data).

        Raises:
            ProtocolError: no such buffer on this tile.
        """
        try:
            return self.buffers[name]
        except KeyError:
            raise ProtocolError(f"tile {self.index}: no buffer {name!r}; buffers: {sorted(self.buffers)}") from None

    # ---- moving a tile to another process ------------------------------------------------------
    def export_buffers(self, static: Sequence[str]) -> dict[str, Any]:
        """Every buffer that is not an alias, as plain arrays, at any time (a move copies most of a tile's state
        while the tile keeps running). A copy of each but the ``static`` ones (no protocol writes them) is kept,
        so that ``export_state(changes=True)`` sends only what changed since."""
        names = [n for n, b in self.buffers.items() if not b.alias]
        self._baseline = {n: self.buffers[n].data.copy() for n in names
                          if n not in static and self.buffers[n].data is not None}
        return {"buffers": {n: self._whole(self.buffers[n]) for n in names}}

    def export_state(self, skip: Sequence[str] = (), sparse: bool = False, changes: bool = False) -> dict[str, Any]:
        """Between runs: every buffer but ``skip``, plus the clocks, SRAM accounting and counts.

        ``changes``: a buffer with a copy kept by ``export_buffers`` (same shape) goes as the
        entries (blocks along its last axis) whose bytes changed since, for the tile that got
        that export. ``sparse``: a buffer goes as its entries that are not all zero bytes (a KV
        cache mostly empty).

        Raises:
            ProtocolError: a buffer is an alias (a protocol is under way: move a tile between runs).
        """
        aliases = [n for n, b in self.buffers.items() if b.alias]
        if aliases:
            raise ProtocolError(f"tile {self.index}: buffers {aliases} are aliases of a run under way; move tiles between runs")
        base = {}
        if changes:
            base, self._baseline = self._baseline, {}
        out: dict[str, Any] = {}
        for n, b in self.buffers.items():
            if n in skip:
                continue
            old = base.get(n)
            if b.data is not None and old is not None and old.shape == b.data.shape and old.dtype == b.data.dtype:
                changed = np.nonzero((_entry_bytes(b.data) != _entry_bytes(old)).any(axis=-1))
                out[n] = ("changes", changed, b.data[changed])
            elif b.data is not None and sparse:
                filled = np.nonzero(_entry_bytes(b.data).any(axis=-1))
                out[n] = ("sparse", b.block, b.dtype.str, b.cores, _stacked(b), b.data.shape, filled, b.data[filled])
            else:
                out[n] = self._whole(b)
        return {"buffers": out, "names": list(self.buffers), **{k: getattr(self, k) for k in _STATE},
                "stats": dict(self.stats)}

    @staticmethod
    def _whole(b: Buffer) -> tuple:
        return ("whole", b.block, b.dtype.str, b.cores, b.data, _stacked(b))

    def import_state(self, state: dict[str, Any]) -> None:
        """Take the buffers (and, if there, the clocks, SRAM accounting and counts) of ``export_buffers`` or
        ``export_state``; after the latter, buffers it does not name are dropped."""
        for name, part in state["buffers"].items():
            if part[0] == "changes":
                _, where, values = part
                self.buffers[name].data[where] = values
                continue
            if part[0] == "sparse":
                _, block, dtype, cores, stacked, shape, where, values = part
                data = np.zeros(shape, dtype)
                data[where] = values
                part = ("whole", block, dtype, cores, data, stacked)
            _, block, dtype, cores, data, stacked = part
            if data is not None:  # our own copy (Ray's is read-only); a stacked buffer keeps each entry contiguous
                data = np.moveaxis(np.array(np.moveaxis(data, 2, 0), order="C"), 0, 2) if stacked else np.array(data)
            self.buffers[name] = Buffer(tuple(block), np.dtype(dtype), np.array(cores), data)
        if "names" in state:
            for name in [n for n in self.buffers if n not in state["names"]]:
                del self.buffers[name]
        for k in _STATE:
            if k in state:
                getattr(self, k)[...] = state[k]
        if "stats" in state:
            self.stats = Counter(state["stats"])

    # ---- clocks and compute ---------------------------------------------------------------
    def set_tracing(self, marks: bool, activity: bool) -> None:
        self.tracing, self.counting = bool(marks), bool(activity)

    def activity(self) -> tuple[np.ndarray, np.ndarray]:
        """What counting recorded: compute cycles per core ``[y, x]`` and bytes per directed link ``[4, y, x]``."""
        return self.busy.copy(), self.link_bytes.copy()

    def _count_links(self, transfer: Transfer, nbytes: float) -> None:
        r = self.rect
        self.link_bytes += transfer.link_streams()[:, r.y0 : r.y1, r.x0 : r.x1] * nbytes

    def mark(self, label: str) -> None:
        """End of a phase of the running protocol, when tracing: the latest core's clock, the compute on its
        critical path so far, and the host time since the run started. A label that starts with ``.`` ends a
        part of the next phase (a step of a GEMM inside an operation)."""
        if self.tracing:
            i = int(np.argmax(self.clock))
            self._marks.append((label, float(self.clock.flat[i]), float(self.path_compute.flat[i]), time.perf_counter()))

    def clocks(self) -> np.ndarray:
        return self.clock.copy()

    def flat_clocks(self) -> tuple[np.ndarray, ...]:
        """The per-core timing state as flat views: clock, fwd_head, relaying, sent, stages, path_compute."""
        return tuple(a.ravel() for a in (self.clock, self.fwd_head, self.relaying, self.sent, self.stages, self.path_compute))

    def reset_clocks(self) -> None:
        self.clock[...] = 0.0
        self.fwd_head[...] = 0.0
        self.relaying[...] = False
        self.sent[...] = 0.0

    def local(self, mask: np.ndarray) -> np.ndarray:
        """Cut this tile's part out of a global ``[y, x, ...]`` array."""
        r = self.rect
        return mask[r.y0 : r.y1, r.x0 : r.x1]

    def charge(self, fmacs: float | np.ndarray, dtype: str, cores: np.ndarray | None = None, calls: int = 1,
               maps: int = 0) -> None:
        """Advance the clocks of ``cores`` (local mask; default all) by one task: ``fmacs`` FMACs issued as
        ``calls`` vector instructions from ``maps`` loops over a DSD (a GEMV's one, a GEMM step's one per row of B)."""
        cycles = self.costs.compute(fmacs, self._rate(dtype), calls, maps)
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

    def switch_tasks(self, n: int) -> None:
        """Charge every core ``n`` task switches: the tasks of a collective's phases, set up one after another."""
        cycles = n * self.costs.task_overhead
        self.clock += cycles
        self.path_compute += cycles
        if self.counting:
            self.busy += cycles

    def _rate(self, dtype: Any) -> float:
        """FMACs per cycle for ``dtype`` (memoised: dtype names are slow to build)."""
        rate = self._rates.get(dtype)
        if rate is None:
            rate = self._rates[dtype] = self.device.rate(np.dtype(dtype).name)
        return rate

    # ---- fabric ---------------------------------------------------------------------------
    def send(self, transfer: Transfer, name: str, *, stream: bool = False, select: tuple[slice, ...] | None = None) -> None:
        """Start the flows of ``transfer`` whose sources are on this tile; never waits.

        Args:
            transfer: the step's flows.
            name: buffer whose blocks are sent.
            stream: sources that took a stream in their last receive forward it as it arrives
                (head at their ``fwd_head``) instead of waiting for the whole block; other
                sources send as usual.
            select: send only this slice of each block (a DSD over part of the buffer).
        """
        self._check_route(transfer)
        tag = self._tag(transfer, self._sent)
        buf = self.buffer(name)
        nbytes = buf.nbytes
        if select is not None:
            nbytes = math.prod(len(range(*s.indices(n))) for s, n in zip(select, buf.block)) * buf.dtype.itemsize
            nbytes *= math.prod(buf.block[len(select):])
        if self.counting:
            self._count_links(transfer, nbytes)
        costs = self.costs
        state = self.flat_clocks()
        for dest, lp in self._parts(transfer, "out").items():
            n = len(lp.fi)
            head, tail, stages, compute = np.empty(n), np.empty(n), np.empty(n, dtype=np.int64), np.empty(n)
            send_flows(*state, lp.fi, lp.load, lp.latency_hops, lp.relays, costs.duration(nbytes),
                       costs.alpha, costs.beta, stream, head, tail, stages, compute)
            data = None
            if buf.data is not None:
                data = buf.data.reshape((-1,) + buf.block)[lp.fi_src]
                if select is not None:
                    data = data[(slice(None), *select)]
            msg = Message(self._run_id, tag, self.index, data, head, tail, stages, compute)
            self._count(dest, n, n * nbytes)
            if dest == self.index:
                self._slot(tag, dest).set_result(msg)
            else:
                raw = encode(msg)
                self._count_actor(dest, len(raw))
                self.post(dest, raw)

    def _parts(self, transfer: Transfer, way: str) -> dict[int, _Local]:
        """The transfer's parts on this tile (``out``: what it sends, ``in``: what it receives), in flat indices."""
        key = (transfer.key, way)
        cached = self._local_parts.get(key)
        if cached is not None and cached[0] is transfer:
            return cached[1]
        view = transfer.view(self.tiling, self.index)
        w, y0, x0 = self.rect.shape[1], self.rect.y0, self.rect.x0
        parts = {}
        if way == "out":
            for dest, part in view.outgoing.items():
                f, s = part.flows, part.sources
                fi = (transfer.src_y[f] - y0) * w + transfer.src_x[f] - x0
                fi_src = (transfer.src_y[s] - y0) * w + transfer.src_x[s] - x0
                parts[dest] = _Local(fi, fi_src, transfer.load[f], transfer.hops[f], transfer.relays[f])
        else:
            for src, part in view.incoming.items():
                f = part.flows
                fi = (transfer.dst_y[f] - y0) * w + transfer.dst_x[f] - x0
                parts[src] = _Local(fi, part.inverse, transfer.load[f], transfer.hops[f], transfer.relays[f],
                                    _span(fi), bool((part.inverse == np.arange(len(f))).all()))
        size = sum(len(lp.fi) for lp in parts.values())
        if self._local_size + size > LOCAL_PARTS_BUDGET:  # many large one-off transfers (SUMMA's casts) would pile up
            self._local_parts.clear()
            self._local_size = 0
        self._local_parts[key] = (transfer, parts)
        self._local_size += size
        return parts

    async def recv(self, transfers: Transfer | Sequence[Transfer], name: str, *, op: str = "store", stream: bool = False) -> None:
        """Receive the flows of one step's transfers that end on this tile into buffer ``name``.

        A core fed by several of the transfers takes them at once (they come in on different
        links); the blocks are combined in the order the transfers are given.

        Args:
            op: ``store`` replaces the block, ``add`` / ``max`` combine it with the block held.
            stream: the receiving cores process the streams as they arrive (a software relay
                stage: ``beta`` after the head) and may forward with ``send(stream=True)``.
        """
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        transfers = [transfers] if isinstance(transfers, Transfer) else list(transfers)
        buf = self.buffer(name)
        state = self.flat_clocks()
        combine = 0.0 if op == "store" else self.costs.combine(math.prod(buf.block), self._rate(buf.dtype))
        fed = []
        for transfer in transfers:
            self._check_route(transfer)
            tag = self._tag(transfer, self._received)
            for src, lp in self._parts(transfer, "in").items():
                msg = await self._take(tag, src)
                if buf.data is not None:
                    _combine(buf, lp.fi if lp.span is None else lp.span, msg.data if lp.in_order else msg.data[lp.fi_src], op)
                arrive(state[0], state[4], state[5], lp.fi, msg.head, msg.tail, msg.stages, msg.compute, combine,
                       self.costs.beta, stream, *self.acc)
                fed.append(lp.fi)
        if fed:
            settle(*state, np.concatenate(fed), self.costs.beta, self.costs.call_overhead, stream, *self.acc)

    async def exchange(self, program: Program, name: str, into: str | None = None) -> None:
        """Run the steps of ``program`` (a collective): send from buffer ``name``, receive into ``into`` (default: ``name``).

        The step executor sends each step's transfers and receives them, with messages; the
        fused one runs the steps as compiled loops over the tile's cores and batches what
        crosses to other tiles (``program.Fused``).
        """
        fused = self._fused_program(program, name, into or name)
        if fused is None:
            for step in program.steps:
                for t in step.transfers:
                    self.send(t, name, stream=step.stream)
                await self.recv(step.transfers, into or name, op=step.op, stream=step.stream)
            return
        missing = program.routes - self._routes
        if missing:
            self._check_route(next(t for s in program.steps for t in s.transfers if t.route in missing))
        buf, dest = self.buffers[name], self.buffers[into or name]
        if dest.block != buf.block or dest.dtype != buf.dtype:
            raise ValueError(f"exchange from {name!r} into {into!r}: blocks {buf.block} {buf.dtype} and {dest.block} {dest.dtype} differ")
        size = math.prod(buf.block)
        flat = lambda b: None if b.data is None else b.data.reshape(self.clock.size, size)  # noqa: E731
        n = self._sent[program.key]
        self._sent[program.key] += 1
        if self.counting:
            links = self._program_links.get(program.key)
            if links is None:
                r = self.rect
                links = self._program_links[program.key] = sum(
                    t.link_streams()[:, r.y0 : r.y1, r.x0 : r.x1] for s in program.steps for t in s.transfers)
            self.link_bytes += links * buf.nbytes
        await fused.run(self, f"{program.key}#{n}", flat(buf), flat(dest), self.costs.duration(buf.nbytes),
                        self.costs.combine(size, self._rate(buf.dtype)))
        for where, flows in (("local", fused.local_flows), ("remote", fused.remote_flows)):
            self.stats[f"core_messages_{where}"] += flows
            self.stats[f"core_bytes_{where}"] += flows * buf.nbytes
        self.stats["steps_fused"] += len(program.steps)

    def _fused_program(self, program: Program, *names: str) -> Fused | None:
        """``program`` flattened for the fused executor, or None where it runs step by step."""
        if self.executor != "fused":
            return None
        for buf in map(self.buffer, names):
            if buf.data is not None and (not buf.data.flags.c_contiguous or buf.dtype not in (np.float32, np.float64)):
                return None  # the compiled loop reads a contiguous float block per core
        cached = self._fused.get(program.key)
        if cached is None or cached[0] is not program:
            if len(self._fused) >= FUSED_CACHE:  # drop the oldest (a decode token's KV shift is a new program)
                del self._fused[next(iter(self._fused))]
            cached = self._fused[program.key] = (program, Fused.build(program, self))
        return cached[1]

    def post_batch(self, dest: int, tag: str, data: np.ndarray | None, head: np.ndarray, tail: np.ndarray,
                   stages: np.ndarray, compute: np.ndarray) -> None:
        """Send tile ``dest`` the flows of several steps at once (the fused executor; one block per flow)."""
        raw = encode(Message(self._run_id, tag, self.index, data, head, tail, stages, compute))
        self._count_actor(dest, len(raw))
        self.post(dest, raw)

    async def take_batch(self, tag: str, src: int) -> Message:
        """Wait for the batch ``tag`` from tile ``src``."""
        return await self._take(tag, src)

    # ---- fused steps: a transfer inside the tile, timed by the same rules, data moved by index --
    def fuses(self, *transfers: Transfer | None) -> bool:
        """Whether the fused executor may run these transfers without messages: every flow stays on this tile."""
        if self.executor != "fused":
            return False
        for t in transfers:
            if t is not None:
                view = t.view(self.tiling, self.index)
                if set(view.outgoing) - {self.index} or set(view.incoming) - {self.index}:
                    return False
        return True

    def start_local(self, transfer: Transfer, nbytes: int, *, stream: bool = False) -> tuple[np.ndarray, ...]:
        """Start a transfer that ``fuses`` (timing only: the caller moves the data); returns what ``land_local`` takes."""
        self._check_route(transfer)
        self._tag(transfer, self._sent)  # keep the step tags in step with tiles that run it step by step
        self._tag(transfer, self._received)
        if self.counting:
            self._count_links(transfer, nbytes)
        costs = self.costs
        parts = self._parts(transfer, "out")
        if not parts:
            return ()
        lp = parts[self.index]
        n = len(lp.fi)
        head, tail, stages, compute = np.empty(n), np.empty(n), np.empty(n, dtype=np.int64), np.empty(n)
        args = (*self.flat_clocks(), lp.fi, lp.load, lp.latency_hops, lp.relays, costs.duration(nbytes),
                costs.alpha, costs.beta, stream, head, tail, stages, compute)
        if transfer.multicast or n < SPLIT_FLOWS:
            send_flows(*args)
        else:
            send_flows_split(*args, numba.get_num_threads())
        self._count(self.index, n, n * nbytes)
        self.stats["steps_fused"] += 1
        return self._parts(transfer, "in")[self.index].fi, head, tail, stages, compute

    def land_local(self, started: tuple[np.ndarray, ...]) -> None:
        """Receive a transfer begun with ``start_local`` (a plain store, as ``recv`` of it would)."""
        if started:
            args = (*self.flat_clocks(), *started, 0.0, self.costs.beta, self.costs.call_overhead, False)
            if len(started[0]) < SPLIT_FLOWS:
                receive_one(*args)
            else:
                receive_one_split(*args, numba.get_num_threads())

    def local_flows(self, transfer: Transfer) -> tuple[np.ndarray, np.ndarray]:
        """(source, destination) flat core indices of each flow of a transfer that ``fuses``."""
        out = self._parts(transfer, "out").get(self.index)
        if out is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return out.fi, self._parts(transfer, "in")[self.index].fi

    def move_local(self, transfer: Transfer, src: str, dst: str) -> None:
        """Copy the blocks of ``src`` into ``dst`` as ``transfer``'s flows would deliver them."""
        if self.cost_only:
            return
        out, inc = self._parts(transfer, "out").get(self.index), self._parts(transfer, "in").get(self.index)
        if out is None:
            return
        a, b = self.buffer(src), self.buffer(dst)
        flat = a.data.reshape((-1,) + a.block)
        if inc.span is not None and not b.alias and b.data.flags.c_contiguous and b.dtype == a.dtype:
            np.take(flat, out.fi, axis=0, out=b.data.reshape((-1,) + b.block)[inc.span])  # one pass, straight into place
            return
        _combine(b, inc.fi if inc.span is None else inc.span, flat[out.fi], "store")

    def _check_route(self, transfer: Transfer) -> None:
        if transfer.route not in self._routes:
            raise ProtocolError(
                f"transfer {transfer.key!r} uses route {transfer.route!r}, which the protocol did not declare "
                f"(declared: {sorted(self._routes)})"
            )

    def _tag(self, transfer: Transfer, counter: Counter) -> str:
        n = counter[transfer.key]
        counter[transfer.key] += 1
        return f"{transfer.key}#{n}"

    def _count(self, dest: int, flows: int, nbytes: int) -> None:
        where = "local" if dest == self.index else "remote"
        self.stats[f"core_messages_{where}"] += flows
        self.stats[f"core_bytes_{where}"] += nbytes

    def _count_actor(self, dest: int, nbytes: int) -> None:
        self.stats["tile_messages"] += 1
        self.stats["tile_bytes"] += nbytes
        if self.nodes and self.nodes[dest] != self.nodes[self.index]:
            self.stats["node_messages"] += 1
            self.stats["node_bytes"] += nbytes

    # ---- mailbox --------------------------------------------------------------------------
    def _slot(self, tag: str, src: int, run_id: int | None = None) -> asyncio.Future:
        key = (self._run_id if run_id is None else run_id, tag, src)  # (run, step tag, source tile)
        fut = self._mail.get(key)
        if fut is None:
            fut = self._mail[key] = asyncio.get_running_loop().create_future()
        return fut

    async def _take(self, tag: str, src: int) -> Message:
        fut = self._slot(tag, src)
        if self._aborted_run >= self._run_id and not fut.done():
            raise ProtocolAborted(f"tile {self.index}: run {self._run_id} was aborted")
        t0 = time.perf_counter()
        self._waiting = (tag, src, fut)
        try:
            return await fut
        finally:
            self._waiting = None
            self.stats["wait_s"] += time.perf_counter() - t0
            del self._mail[(self._run_id, tag, src)]

    def waiting_for(self) -> tuple[str, int] | None:
        """(step tag, source tile) of the message this tile's run waits for and has not been sent; None if running."""
        if self._waiting is None or self._waiting[2].done():
            return None
        return self._waiting[:2]

    def deliver(self, raw: bytes) -> None:
        """Accept a message from another tile (called by the transport)."""
        msg = decode(raw)
        if msg.run > self._aborted_run:
            self._slot(msg.tag, msg.src, msg.run).set_result(msg)

    def abort(self, run_id: int) -> None:
        """Stop run ``run_id``: every receive still waiting raises ``ProtocolAborted``."""
        self._aborted_run = max(self._aborted_run, run_id)
        for (rid, _, _), fut in list(self._mail.items()):
            if rid <= run_id and not fut.done():
                fut.set_exception(ProtocolAborted(f"tile {self.index}: run {rid} was aborted"))

    # ---- running a protocol ---------------------------------------------------------------
    async def run(self, path: str, run_id: int, routes: list[str], kwargs: dict[str, Any], io: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
        """Run protocol ``path`` on this tile; return its clock span and statistics.

        ``io``: the host's part, carried by the run: ``reset`` the clocks first, ``put`` {name: blocks} first
        (as ``put``), ``get`` {name: (rows, cols)} after (as ``get``, returned under ``got``).
        """
        if run_id <= self._aborted_run:
            raise ProtocolAborted(f"tile {self.index}: run {run_id} was aborted before it started")
        proto = resolve(path)
        io = io or {}
        if io.get("reset"):
            self.reset_clocks()
        for name, blocks in io.get("put", {}).items():
            self.put(name, blocks)
        for key in [k for k in self._mail if k[0] < run_id]:  # leftovers of aborted runs
            del self._mail[key]
        self._run_id, self._routes = run_id, frozenset(routes)
        self._sent.clear()
        self._received.clear()
        before = Counter(self.stats)
        start = float(self.clock.min())
        self.stages[...] = 0
        self.path_compute[...] = 0.0
        self.relaying[...] = False
        self._marks = []
        t0 = time.perf_counter()
        await proto.body(self, **kwargs)
        self.stats["wall_s"] += time.perf_counter() - t0
        delta = Counter(self.stats)
        delta.subtract(before)
        y, x = np.unravel_index(int(np.argmax(self.clock)), self.clock.shape)  # first latest core, row-major
        return {
            "start": start,
            "end": float(self.clock[y, x]),
            "last_core": (self.rect.y0 + int(y), self.rect.x0 + int(x)),
            "relay_stages": int(self.stages[y, x]),
            "compute_cycles": float(self.path_compute[y, x]),
            "stats": dict(delta),
            "marks": [(label, clock, compute, host - t0) for label, clock, compute, host in self._marks],
            "sram_high": int(self.high.max()),
            "got": {name: self.get(name, *where) for name, where in io.get("get", {}).items()},
        }
