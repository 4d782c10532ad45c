"""One tile: a rectangle of cores run by one actor.

Core is the unit of meaning, tile the unit of execution: every per-core quantity
(buffers, SRAM in use, virtual clock) is an array whose leading axes are the tile's rows
and columns, and every operation is vectorised over them. A protocol body speaks global
core coordinates: ``rows`` and ``cols`` are the tile's own.

The tile is three parts and the fabric: ``memory.Memory`` (buffers, SRAM accounting),
``clocks.Clocks`` (per-core clocks, compute charges, traces) and ``mailbox.Mailbox``
(messages waiting to be taken); this file sends and receives. How messages are timed
(PLMR costs, streaming relays, ``Sendrecv``, critical-path records) is in ``timing``, the
one place both executors use: ``step`` sends and receives step by step, ``fused`` runs a
collective whose flows stay inside the tile as one compiled loop (``program``).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numba
import numpy as np

from .clocks import Clocks
from .device import DeviceSpec
from .errors import ProtocolError
from .fabric.wire import Message, encode
from .mailbox import Mailbox
from .memory import OPS, Buffer, Memory, combine_blocks
from .mesh import Mesh, Tiling
from .program import CHARGE, LAND, SEND, Fused, Program, run_steps
from .protocol import resolve
from .timing import Costs, arrive, receive_one, receive_one_split, send_flows, send_flows_split, settle
from .transfer import Transfer

EXECUTORS = ("fused", "step")
LOCAL_PARTS_BUDGET = 4_000_000  # flows of cached transfer parts per tile (about 150 MB of index arrays)
FUSED_CACHE = 64  # flattened programs kept per tile
SPLIT_FLOWS = 20_000  # a local transfer with this many flows is timed on parallel threads
_STATE = ("clock", "fwd_head", "relaying", "sent", "stages", "path_compute", "used", "high")  # per-core arrays a move copies


def _entry_bytes(a: np.ndarray) -> np.ndarray:
    """The bytes of each entry of ``[h, w, *block]`` data (a block's last axis, or a core's scalar), along the last
    axis: entries compare by their bits (-0.0, NaN)."""
    return np.ascontiguousarray(a if a.ndim > 2 else a[..., None]).view(np.uint8)


def _span(fi: np.ndarray) -> slice | None:
    """``fi`` as a slice when it is a run of consecutive cores (then blocks move without an index array)."""
    if len(fi) and fi[-1] - fi[0] == len(fi) - 1 and bool((np.diff(fi) == 1).all()):
        return slice(int(fi[0]), int(fi[-1]) + 1)
    return None


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


@dataclass(frozen=True)
class _Exchange:
    """What ``Tile.exchange`` of a program between two buffers reads each time (``Tile._prepare``); dropped whenever
    a buffer changes (``Tile._buffers_changed``)."""

    program: Program
    fused: Fused
    routes: frozenset[str]  # the run's routes it was checked against
    data: np.ndarray | None  # the blocks sent and received into, [cores, elements]
    out: np.ndarray | None
    size_cycles: float  # cycles a block occupies a link
    combine: float  # cycles of one combine

    def holds(self, program: Program, fused: Fused, routes: frozenset[str]) -> bool:
        """Whether it is still what that exchange reads: the same program, flattened, checked against these routes."""
        return self.program is program and self.fused is fused and self.routes is routes


class Tile(Memory, Clocks):
    """The cores ``tiling.rects[index]`` of a mesh, with their buffers, clocks and mailbox.

    The same class runs in-process (``fabric.local``) and as a Ray actor (``fabric.ray``);
    a transport gives it ``post(dest_tile, raw_bytes)`` to reach other tiles and hands it
    theirs through ``mailbox``. ``executor`` says how ``exchange`` runs a collective
    (``step`` or ``fused``; see ``program``).
    """

    def __init__(self, index: int, mesh_shape: tuple[int, int], tiles: tuple[int, int], device: DeviceSpec, cost_only: bool,
                 executor: str = "fused", region: tuple[int, int] | None = None, origins: tuple[tuple[int, int], ...] = ((0, 0),)):
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
        self.wafer_tiling = Tiling(Mesh(*mesh_shape), tiles, region, origins)
        self.region, local = divmod(index, self.wafer_tiling.per_region)
        self.origin = self.wafer_tiling.origins[self.region]
        self._view(self.wafer_tiling.region_tiling(), local, index - local)
        self.device = device
        self.costs = Costs.of(device)
        self.cost_only = cost_only
        self.executor = executor
        self._exchanges: dict[tuple, _Exchange] = {}  # (program, from, into) -> what its exchange reads each time
        Memory.__init__(self)
        Clocks.__init__(self)
        self.mailbox = Mailbox(index)
        self.stats: Counter = Counter()
        self.post: Callable[[int, bytes], None] | None = None
        self.nodes: list[str] = []
        self._routes: frozenset[str] = frozenset()
        self._sent: Counter = Counter()
        self._received: Counter = Counter()
        self._local_size = 0  # flows held in _local_parts
        self._local_parts: dict[tuple[str, str], tuple[Transfer, dict[int, _Local]]] = {}
        self._fused: dict[str, tuple[Program, Fused]] = {}
        self._baseline: dict[str, np.ndarray] = {}  # mutable buffers as last sent by export_buffers
        self._program_links: dict[str, np.ndarray] = {}  # a program's streams per link of this tile, per block byte

    def _view(self, tiling: Tiling, index: int, base: int) -> None:
        """Speak the coordinates of ``tiling``, in which this tile is number ``index`` (``base`` + ``index`` on the wafer)."""
        self.tiling, self.index, self.base = tiling, index, base
        self.rect = tiling.rects[index]
        self.rows = np.arange(self.rect.y0, self.rect.y1)  # mesh row of each local row
        self.cols = np.arange(self.rect.x0, self.rect.x1)  # mesh column of each local column

    @property
    def number(self) -> int:
        """This tile's number on the wafer (``index`` is its number in the tiling spoken now)."""
        return self.base + self.index

    @contextmanager
    def on_wafer(self) -> Iterator[None]:
        """Protocol code inside speaks the wafer's coordinates (a transfer between regions); outside, its region's."""
        saved = (self.tiling, self.index, self.base)
        self._view(self.wafer_tiling, self.number, 0)
        try:
            yield
        finally:
            self._view(*saved)

    # ---- wiring ---------------------------------------------------------------------------
    def connect(self, post: Callable[[int, bytes], None], nodes: list[str]) -> None:
        """Give the tile a way to reach other tiles and the node each tile runs on."""
        self.post, self.nodes = post, list(nodes)

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
            raise ProtocolError(f"tile {self.number}: buffers {aliases} are aliases of a run under way; move tiles between runs")
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
                out[n] = ("sparse", b.block, b.dtype.str, b.cores, b.stacked, b.data.shape, filled, b.data[filled])
            else:
                out[n] = self._whole(b)
        return {"buffers": out, "names": list(self.buffers), **{k: getattr(self, k) for k in _STATE},
                "stats": dict(self.stats)}

    @staticmethod
    def _whole(b: Buffer) -> tuple:
        return ("whole", b.block, b.dtype.str, b.cores, b.data, b.stacked)

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
        self._buffers_changed()
        for k in _STATE:
            if k in state:
                getattr(self, k)[...] = state[k]
        if "stats" in state:
            self.stats = Counter(state["stats"])

    # ---- global coordinates ----------------------------------------------------------------
    def local(self, mask: np.ndarray) -> np.ndarray:
        """Cut this tile's part out of a global ``[y, x, ...]`` array."""
        r = self.rect
        return mask[r.y0 : r.y1, r.x0 : r.x1]

    def local_rows(self, ys: np.ndarray | int) -> np.ndarray:
        """The local row of each global row in ``ys``; -1 where the row is not on this tile."""
        ys = np.asarray(ys)
        return np.where((ys >= self.rect.y0) & (ys < self.rect.y1), ys - self.rect.y0, -1)

    def local_cols(self, xs: np.ndarray | int) -> np.ndarray:
        """The local column of each global column in ``xs``; -1 where the column is not on this tile."""
        xs = np.asarray(xs)
        return np.where((xs >= self.rect.x0) & (xs < self.rect.x1), xs - self.rect.x0, -1)


    # ---- fabric ---------------------------------------------------------------------------
    def _count_links(self, transfer: Transfer, nbytes: float) -> None:
        r = self.rect
        self.link_bytes += transfer.link_streams()[:, r.y0 : r.y1, r.x0 : r.x1] * nbytes

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
        nbytes = buf.nbytes if select is None else buf.part_bytes(select)
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
            msg = Message(self.mailbox.run_id, tag, self.number, data, head, tail, stages, compute)
            self._count(dest, n, n * nbytes)
            if dest == self.index:
                self.mailbox.put(msg)
            else:
                self._post(dest, encode(msg))

    def _parts(self, transfer: Transfer, way: str) -> dict[int, _Local]:
        """The transfer's parts on this tile (``out``: what it sends, ``in``: what it receives), in flat indices."""
        key = (transfer.key, way)
        cached = self._local_parts.get(key)
        if cached is not None and cached[0] is transfer:
            return cached[1]
        view = transfer.view(self.tiling, self.index)
        w, y0, x0 = self.rect.shape[1], self.rect.y0, self.rect.x0
        parts = {}
        for other, part in (view.outgoing if way == "out" else view.incoming).items():
            f = part.flows
            of = (lambda a: a) if len(f) == len(transfer) else (lambda a: a[f])  # noqa: E731  (every flow: in order)
            ys, xs = (transfer.src_y, transfer.src_x) if way == "out" else (transfer.dst_y, transfer.dst_x)
            fi = (of(ys) - y0) * w + of(xs) - x0
            path = (of(transfer.load), of(transfer.hops), of(transfer.relays))
            if way == "out":
                s = part.sources
                parts[other] = _Local(fi, (transfer.src_y[s] - y0) * w + transfer.src_x[s] - x0, *path)
            else:
                parts[other] = _Local(fi, part.inverse, *path, _span(fi), bool((part.inverse == np.arange(len(f))).all()))
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
        combine = 0.0 if op == "store" else self.costs.combine(math.prod(buf.block), self.rate(buf.dtype))
        fed = []
        for transfer in transfers:
            self._check_route(transfer)
            tag = self._tag(transfer, self._received)
            for src, lp in self._parts(transfer, "in").items():
                msg = await self._take(tag, src)
                if buf.data is not None:
                    combine_blocks(buf, lp.fi if lp.span is None else lp.span, msg.data if lp.in_order else msg.data[lp.fi_src], op)
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
        buf = self.buffers[name]
        key = (program.key, name, into)
        ex = self._exchanges.get(key)
        if ex is None or not ex.holds(program, fused, self._routes):
            ex = self._exchanges[key] = self._prepare(program, fused, name, into or name)
        n = self._sent[program.key]
        self._sent[program.key] += 1
        if self.counting:
            links = self._program_links.get(program.key)
            if links is None:
                r = self.rect
                links = self._program_links[program.key] = sum(
                    t.link_streams()[:, r.y0 : r.y1, r.x0 : r.x1] for s in program.steps for t in s.transfers)
            self.link_bytes += links * buf.nbytes
        await fused.run(self, f"{program.key}#{n}", ex.data, ex.out, ex.size_cycles, ex.combine)
        stats, nbytes = self.stats, buf.nbytes
        stats["core_messages_local"] += fused.local_flows
        stats["core_bytes_local"] += fused.local_flows * nbytes
        stats["core_messages_remote"] += fused.remote_flows
        stats["core_bytes_remote"] += fused.remote_flows * nbytes
        stats["steps_fused"] += len(program.steps)

    def _buffers_changed(self) -> None:
        self._exchanges.clear()  # they and the fused programs' last runs hold the buffers' arrays
        for _, fused in self._fused.values():
            fused.forget()

    def _prepare(self, program: Program, fused: Fused, name: str, into: str) -> _Exchange:
        """What ``exchange`` of ``program`` from buffer ``name`` into ``into`` reads each time: its routes checked,
        its blocks as ``[cores, elements]``, its cycles per block and per combine."""
        missing = program.routes - self._routes
        if missing:
            self._check_route(next(t for s in program.steps for t in s.transfers if t.route in missing))
        buf, dest = self.buffers[name], self.buffers[into]
        if dest.block != buf.block or dest.dtype != buf.dtype:
            raise ValueError(f"exchange from {name!r} into {into!r}: blocks {buf.block} {buf.dtype} and {dest.block} {dest.dtype} differ")
        size = math.prod(buf.block)
        flat = lambda b: None if b.data is None else b.data.reshape(self.clock.size, size)  # noqa: E731
        return _Exchange(program, fused, self._routes, flat(buf), flat(dest), self.costs.duration(buf.nbytes),
                         self.costs.combine(size, self.rate(buf.dtype)))

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

    def post_batch(self, dest: int, tag: str, data: np.ndarray | None, start: np.ndarray, own: np.ndarray,
                   stages: np.ndarray, compute: np.ndarray) -> None:
        """Send tile ``dest`` the flows of several steps at once (the fused executor): per distinct source its block,
        departure (``start``, ``own``: ``timing.departure``) and record (``stages``, ``compute``)."""
        self._post(dest, encode(Message(self.mailbox.run_id, tag, self.number, data, start, own, stages, compute)))

    async def take_batch(self, tag: str, src: int) -> Message:
        """Wait for the batch ``tag`` from tile ``src``."""
        return await self._take(tag, src)

    def has_batch(self, tag: str, src: int) -> bool:
        """Whether the batch ``tag`` from tile ``src`` has arrived (``take_batch`` would not wait)."""
        return self.mailbox.has(tag, self.base + src)

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

    def shift_lines(self, transfers: Sequence[Transfer], along: str, until: np.ndarray, nbytes: Sequence[int],
                    order: np.ndarray | None = None) -> bool:
        """Shift whole lines along ``along`` (a line is a column for ``y``, a row for ``x``) in rounds of ``transfers``
        (ring shifts that ``fuse``), as ``start_local`` and ``land_local`` would round by round: line ``l`` moves by
        transfer ``k`` in the first ``until[k, l]`` rounds (one way only), each round sending a block of each of
        ``nbytes``, then receiving them all. Timed at once (``run_steps``); ``order`` (the core whose block each core
        holds) moves with the blocks. Returns whether it ran (see ``run_steps``; if not, nothing was done)."""
        if ((until > 0).sum(axis=0) > 1).any():
            raise ProtocolError("shift_lines moves a line one way; here a line moves both ways")
        moving = [(t, u) for t, u in zip(transfers, until) if u.any()]
        shape = self.tiling.mesh.shape
        at = {t: np.broadcast_to(u[None, :] if along == "y" else u[:, None], shape) for t, u in moving}
        script = [("send", t, n) for t, _ in moving for n in nbytes] + [("land", t) for t, _ in moving for _ in nbytes]
        if not moving:
            return True
        if not self.run_steps(int(until.max()), script, at):
            return False
        if order is not None:
            flows = [(*self.local_flows(t), at[t][self.rect.y0 : self.rect.y1, self.rect.x0 : self.rect.x1].ravel())
                     for t, _ in moving]
            for rnd in range(int(until.max())):
                for src, dst, rounds in flows:
                    go = rounds[src] > rnd
                    order[dst[go]] = order[src[go]]
        return True

    def run_steps(self, steps: int, script: Sequence[tuple], until: dict[Transfer, np.ndarray] | None = None) -> bool:
        """Time ``steps`` repeats of ``script`` at once, as the calls it names would one by one: ``("send", transfer,
        nbytes)`` (``start_local``), ``("land", transfer)`` (``land_local``), ``("charge", cycles)`` (``charge`` of
        every core). ``until`` (if given): for each transfer, ``[h, w]`` over the mesh, how many of the first steps
        the flow leaving each core moves in (the others run the transfer's part of the moving flows, as rounds of
        ``Transfer.subset`` would). Only where every transfer ``fuses`` and is no multicast, is landed as often as
        it is sent in a step (the n-th land takes the n-th send's blocks), every send before every land, no mark
        reads the clocks between steps, and (with ``until``) nothing counts activity; returns whether it ran (if not,
        nothing was done)."""
        transfers = list(dict.fromkeys(op[1] for op in script if op[0] != "charge"))
        if self.tracing or not transfers or not self.fuses(*transfers) or any(t.multicast for t in transfers):
            return False
        if until is not None and self.counting:
            return False
        kinds = [op[0] for op in script if op[0] != "charge"]
        sends, lands = ([op[1] for op in script if op[0] == kind] for kind in ("send", "land"))
        if kinds != sorted(kinds, key=lambda kind: kind == "land") or Counter(sends) != Counter(lands):
            return False
        for t in transfers:
            self._check_route(t)
        parts, r = [], self.rect
        for t in transfers:
            lp, none = self._parts(t, "out").get(self.index), np.zeros(0, dtype=np.int64)
            src, dst = self.local_flows(t)
            moves = np.full(len(src), steps) if until is None else until[t][r.y0 : r.y1, r.x0 : r.x1].ravel()[src]
            parts.append((src, dst, *((lp.load, lp.latency_hops, lp.relays) if lp else (none,) * 3), moves))
        ptr = np.cumsum([0] + [len(p[0]) for p in parts])
        cols = [np.concatenate(c) for c in zip(*parts)]
        codes, which, amount, pair, unlanded = [], [], [], [], {t: [] for t in transfers}
        for i, op in enumerate(script):  # each operation's transfer, its cycles (a charge's, a send's block's) ...
            codes.append({"charge": CHARGE, "send": SEND, "land": LAND}[op[0]])
            which.append(-1 if op[0] == "charge" else transfers.index(op[1]))
            amount.append(op[1] if op[0] == "charge" else self.costs.duration(op[2]) if op[0] == "send" else 0.0)
            if op[0] == "send":
                unlanded[op[1]].append(i)
            pair.append(unlanded[op[1]].pop(0) if op[0] == "land" else -1)  # ... and the send a land takes
        costs = self.costs
        if not run_steps(*self.flat_clocks(), self.busy.ravel() if self.counting else np.zeros(0), *cols, ptr,
                         np.array(codes), np.array(which), np.array(amount, dtype=float), np.array(pair), steps,
                         costs.alpha, costs.beta, costs.call_overhead):
            return False
        for op in script:
            if op[0] == "send":
                t, nbytes = op[1], op[2]
                moves = np.minimum(parts[transfers.index(t)][5], steps)
                rounds = int(moves.max(initial=0))  # the steps in which some flow of it moves
                self._sent[t.key] += rounds  # the step tags start_local would have taken
                self._received[t.key] += rounds
                n = int(moves.sum())
                self._count(self.index, n, n * nbytes)
                self.stats["steps_fused"] += rounds
                if self.counting:
                    self._count_links(t, nbytes * steps)
        return True

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
        combine_blocks(b, inc.fi if inc.span is None else inc.span, flat[out.fi], "store")

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

    def _post(self, dest: int, raw: bytes) -> None:
        """Send tile ``dest`` (of the tiling spoken now) a message, counted."""
        dest += self.base
        self.stats["tile_messages"] += 1
        self.stats["tile_bytes"] += len(raw)
        if self.nodes and self.nodes[dest] != self.nodes[self.number]:
            self.stats["node_messages"] += 1
            self.stats["node_bytes"] += len(raw)
        self.post(dest, raw)

    async def _take(self, tag: str, src: int) -> Message:
        t0 = time.perf_counter()
        try:
            return await self.mailbox.take(tag, self.base + src)
        finally:
            self.stats["wait_s"] += time.perf_counter() - t0

    # ---- running a protocol ---------------------------------------------------------------
    async def run(self, path: str, run_id: int, routes: list[str], kwargs: dict[str, Any], io: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
        """Run protocol ``path`` on this tile; return its clock span and statistics.

        ``io``: the host's part, carried by the run: ``reset`` the clocks first, ``put`` {name: blocks} first
        (as ``put``), ``get`` {name: (rows, cols)} after (as ``get``, returned under ``got``); ``skip``: the run
        is another region's, return at once.
        """
        self.mailbox.start(run_id)
        io = io or {}
        if io.get("skip"):  # a run of another region
            return {}
        proto = resolve(path)
        if io.get("reset"):
            self.reset_clocks()
        for name, blocks in io.get("put", {}).items():
            self.put(name, blocks)
        self._routes = frozenset(routes)
        self._sent.clear()
        self._received.clear()
        before = Counter(self.stats)
        start = float(self.clock.min())
        self.stages[...] = 0
        self.path_compute[...] = 0.0
        self.relaying[...] = False
        self.marks = []
        self.stamps = {}
        t0 = time.perf_counter()
        await proto.body(self, **kwargs)
        self.stats["wall_s"] += time.perf_counter() - t0
        delta = Counter(self.stats)
        delta.subtract(before)
        y, x = np.unravel_index(int(np.argmax(self.clock)), self.clock.shape)  # first latest core, row-major
        return {
            "start": start,
            "end": float(self.clock[y, x]),
            "last_core": (self.origin[0] + self.rect.y0 + int(y), self.origin[1] + self.rect.x0 + int(x)),  # on the wafer
            "relay_stages": int(self.stages[y, x]),
            "compute_cycles": float(self.path_compute[y, x]),
            "stats": dict(delta),
            "marks": [(label, clock, compute, host - t0) for label, clock, compute, host in self.marks],
            "stamps": self.stamps,
            "sram_high": int(self.high.max()),
            "got": {name: self.get(name, *where) for name, where in io.get("get", {}).items()},
        }
