"""Ray transport: one async Ray actor per tile, talking to its peers directly.

Each tile actor holds handles to every other tile. A message to another tile goes over a
socket between the two actors (``sockets``): a Unix socket on the same node, TCP to a tile
on another node; with ``RayOptions(direct=False)``, or to a peer whose TCP port a tile
cannot reach, as a fire-and-forget ``deliver.remote(raw)``. No data passes through the
driver. The actors are async so that a tile waiting for a neighbour keeps accepting
deliveries (sync actors blocking in ``ray.get`` on each other deadlock).

Placement: tiles are numbered row-major and cut into contiguous runs, one run per node
(node-affinity scheduling), so neighbouring tiles mostly share a node.

Names: tile i of a wafer is the actor ``wafer-<id>/tile-<i>`` in the Ray namespace
``wafer-llm`` (``ray list actors`` shows them with their node and process). A tile whose
actor dies (its process killed, its node gone) surfaces as ``TileLost`` from any call.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
import warnings
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..device import DeviceSpec
from ..errors import NodeMemoryError, ProtocolError, TileLost
from ..mesh import Tiling
from ..tile import Tile
from .base import LOAD_BYTES, Transport, first_error
from .sockets import Address, Inbox, Outbox


def _batch_policy() -> None:
    """Run this process's threads (and those they start) under Linux's batch policy: a thread woken by a message
    then waits for its turn instead of preempting the one that woke it. Several tiles on one machine's cores pass
    messages back and forth; the sender goes on to its next steps (and messages) instead of losing its core at
    each send (four Ray tiles on two cores, three interleaved pairs: 1x4 303-324 -> 269-302 ms a token; 2x2, whose
    collectives wait on more tiles, 343-385 and 353-371)."""
    if not hasattr(os, "SCHED_BATCH"):
        return
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setscheduler(int(tid), os.SCHED_BATCH, os.sched_param(0))
        except OSError:  # a thread that ended meanwhile, or a policy this system refuses: the default is correct too
            pass


def _pin(cores: list[int], rank: int, sharing: int) -> None:
    """Run this process's threads (and those they start) on tile ``rank``'s share of ``cores``, the node's, split
    evenly among the ``sharing`` tiles on the node in tile order (neighbours, which pass most messages, share a core
    where the tiles outnumber the cores). A tile that stays on its cores finds its state in their caches; left to the
    scheduler, each of four tiles on two cores changed cores ~50 times a second (1x4 and 2x2, eight runs of four
    interleaved pairs: 2-12% less time a token pinned in seven, 4% more in one; two tiles, 1x2: no change)."""
    if not hasattr(os, "sched_setaffinity"):
        return
    lo = rank * len(cores) // sharing
    share = set(cores[lo : max(lo + 1, (rank + 1) * len(cores) // sharing)])
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), share)
        except OSError:  # a thread that ended meanwhile: the others are pinned
            pass


class TileActor:
    """The Ray face of a ``Tile``: every method runs on the actor's event loop."""

    def __init__(self, index: int, mesh_shape: tuple[int, int], tiles: tuple[int, int], device: DeviceSpec, cost_only: bool,
                 executor: str, threads: int, region: tuple[int, int], origins: tuple[tuple[int, int], ...], pin: bool):
        import numba

        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))  # this tile's share of its node
        _batch_policy()
        self.cores = sorted(os.sched_getaffinity(0)) if pin and hasattr(os, "sched_getaffinity") else None  # the node's
        self.tile = Tile(index, mesh_shape, tiles, device, cost_only, executor, region, origins)
        self.inbox = Inbox(self.tile.mailbox.deliver)
        self.boxes: dict[int, Outbox] = {}  # peer tile -> socket to it

    async def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    async def pid(self) -> int:
        return os.getpid()

    async def listen(self, tcp: bool) -> Address:
        """Listen for peers: on a Unix socket, and with ``tcp`` (the wafer spans nodes) on a port of this node."""
        return await self.inbox.open(ray.util.get_node_ip_address() if tcp else None)

    async def connect(self, peers: list[Any], nodes: list[str], sockets: list[Address] | None, fresh: list[int]
                      ) -> tuple[list[int], list[str]]:
        """Reach every peer over a socket (with ``sockets``, else as actor calls), kept from an earlier wiring unless
        the peer is ``fresh`` (a new actor); return the peers a socket was opened to now and, for each peer on another
        node whose TCP port did not answer (it gets actor calls instead), why."""
        me = self.tile.index
        if self.cores:
            here = [j for j in range(len(peers)) if nodes[j] == nodes[me]]
            _pin(self.cores, here.index(me), len(here))
        linked = [j for j in range(len(peers)) if sockets and j != me]
        opening = [j for j in linked if j not in self.boxes or j in fresh or me in fresh]
        for j in opening:
            if j in self.boxes:
                self.boxes.pop(j).close()
        unreachable = []

        async def reach(j: int) -> Outbox | None:
            path, port = sockets[j]
            if nodes[j] == nodes[me]:
                return await Outbox.connect(path)
            try:
                return await asyncio.wait_for(Outbox.connect(port), timeout=TCP_CONNECT_S)
            except (OSError, asyncio.TimeoutError) as err:
                unreachable.append(f"tile {me} -> tile {j} at {port[0]}:{port[1]}: {err!r}")
                return None

        opened = dict(zip(opening, await asyncio.gather(*(reach(j) for j in opening))))
        self.boxes.update((j, box) for j, box in opened.items() if box is not None)
        boxes = {j: self.boxes[j] for j in linked if j in self.boxes}

        def post(dest: int, raw: bytes) -> None:
            box = boxes.get(dest)
            if box is None:
                peers[dest].deliver.remote(raw)
            else:
                box.post(raw)

        self.tile.connect(post, nodes)
        return [j for j, box in opened.items() if box is not None], unreachable

    async def seal(self, peers: int) -> None:
        await self.inbox.seal(peers)

    async def deliver(self, raw: bytes) -> None:
        self.tile.mailbox.deliver(raw)

    async def abort(self, run_id: int) -> None:
        self.tile.mailbox.abort(run_id)

    async def waiting_for(self) -> tuple[str, int] | None:
        return self.tile.mailbox.waiting_for()

    async def run(self, path: str, run_id: int, routes: list[str], kwargs: dict[str, Any], io: dict[str, Any]
                  ) -> dict[str, Any]:
        return await self.tile.run(path, run_id, routes, kwargs, io)

    async def call(self, method: str, *args: Any) -> Any:
        return getattr(self.tile, method)(*args)


@dataclass(frozen=True)
class RayOptions:
    """How tile actors are placed.

    Attributes:
        nodes: node ids to spread tiles over, in order; None uses every alive node, the
            driver's first.
        num_cpus: CPUs each tile actor reserves (0 lets many tiles share few cores).
        stall_s: a run in which no tile finishes for this long is checked for a deadlock
            (every running tile waiting for a message); seen twice in a row, it fails.
        direct: tiles send each other messages over sockets, Unix on one node and TCP across
            nodes (False: as actor calls).
        pin: tiles sharing a node run on an even share of its cores each (``_pin``; False: on
            any of them, where the scheduler puts them).
    """

    nodes: tuple[str, ...] | None = None
    num_cpus: float = 0.0
    stall_s: float = 10.0
    direct: bool = True
    pin: bool = True


# A wafer starts one worker process per tile, by design (tiles reserve no CPU so that many
# share few cores). Ray expects no more worker processes starting at once than a node has
# CPUs and warns, repeatedly, at 4x that; a Ray instance we start expects this many.
STARTUP_CONCURRENCY = 256
# Ray starts one idle worker per CPU ahead of the first task; tiles get their own workers as
# they start, so those would only hold ~80 MB each for the whole run.
# Ray puts a call's arguments over 100 KB in its object store, whose shared pages stay resident once used:
# loading a model's weights left ~70% of them there for the whole run. Calls of up to LOAD_BYTES (the
# weights' bands; a token's inputs and results) go inline instead, in the call's own message.
SYSTEM_CONFIG = {"worker_maximum_startup_concurrency": STARTUP_CONCURRENCY, "prestart_worker_first_driver": False,
                 "max_direct_call_object_size": LOAD_BYTES + (1 << 20)}
TCP_CONNECT_S = 10.0  # a tile's TCP port on another node that has not answered by then is taken as unreachable
STREAM_WINDOW = 4  # batches of calls in flight in ``call_stream`` (the host holds their arguments meanwhile)


def start_local_ray(**kwargs: Any) -> None:
    """Start a private local Ray instance for tile actors (quiet: no dashboard, no worker logs, no startup warnings;
    none of Ray's processes that only a cluster or a dashboard needs).

    A private one even where a cluster already runs on this machine (Ray would join it):
    join a cluster by giving its address (``ray.init(address=...)``, ``--address``). Where
    ``RAY_ADDRESS`` is set (a Ray job's driver), join that cluster instead; ``kwargs``
    (options of a local instance) then do not apply.
    """
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
        return
    # Ray >= 2.60 turns on token authentication for a new local instance and warns that it did, at every start; it
    # stays on (the token is Ray's own, in ~/.ray), only the warning is dropped.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             _system_config=SYSTEM_CONFIG, **kwargs)
    # Of the processes Ray started, three serve nobody here: the autoscaler's monitor (one node, never scaled), the
    # log monitor (it forwards worker logs to a driver that asked for none) and the dashboard's head (no dashboard,
    # no jobs submitted to a private instance). Together ~165 MiB, a tenth of a four-tile decode's memory.
    node = ray._private.worker._global_node  # this process started it, so it stops them too
    for kill in (node.kill_monitor, node.kill_log_monitor, node.kill_dashboard):
        kill(check_alive=False)


def describe_cluster() -> str:
    """Which Ray cluster this process uses, in words: its address and nodes."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    return f"Ray instance at {ray.get_runtime_context().gcs_address} ({len(nodes)} node(s))"


def _check_node_memory(tiling: Tiling, device: DeviceSpec, where: list[str]) -> None:
    """Refuse a placement whose tiles could hold more bytes than their node has for actors.

    A tile holds at most its cores' SRAM (every buffer is charged against it), so a node
    needs up to cores x sram_bytes for the tiles placed on it; Ray's ``memory`` resource of
    the node is what it has.

    Raises:
        NodeMemoryError: naming the node, its tiles, the bytes needed and available.
    """
    have = {n["NodeID"]: n["Resources"].get("memory", 0.0) for n in ray.nodes() if n["Alive"]}
    need: dict[str, int] = {}
    tiles: dict[str, int] = {}
    for rect, node in zip(tiling.rects, where):
        need[node] = need.get(node, 0) + rect.shape[0] * rect.shape[1] * device.sram_bytes
        tiles[node] = tiles.get(node, 0) + 1
    for node, nbytes in need.items():
        if node in have and nbytes > have[node]:
            raise NodeMemoryError(
                f"node {node[:12]} would hold {tiles[node]} tile(s) with up to {nbytes / 2**30:.1f} GiB of core memory "
                f"({device.sram_bytes} B per core); Ray gives it {have[node] / 2**30:.1f} GiB. Use more nodes, "
                f"a smaller mesh, or cost_only=True"
            )


def _stop(actors: list[Any], timeout_s: float = 30.0) -> None:
    """Kill ``actors`` and wait until Ray reports each dead (``ray.kill`` only asks), so that their names and
    memory are free when this returns."""
    for a in actors:
        ray.kill(a)
    deadline = time.monotonic() + timeout_s
    for a in actors:
        while time.monotonic() < deadline:
            try:
                ray.get(a.pid.remote(), timeout=max(0.0, deadline - time.monotonic()))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                break
            time.sleep(0.01)  # the call ran before the kill reached the actor


def _unwrap(err: BaseException) -> BaseException:
    """Turn Ray's wrapper back into the error the tile raised."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


NAMESPACE = "wafer-llm"


@dataclass
class Move:
    """Tiles on their way to another node: the new actors and their background copies (``move_start``)."""

    tiles: list[int]
    node: str
    new: dict[int, Any]
    copies: list[Any]
    keep: list[str]


class RayTransport(Transport):
    """Tiles as Ray actors on the cluster ``ray.init`` connected to (started locally if none)."""

    def __init__(self, options: RayOptions | None = None):
        self.options = options or RayOptions()
        self.actors: list[Any] = []
        self._nodes: list[str] = []
        self.name = f"wafer-{uuid.uuid4().hex[:8]}"
        self._moves: Counter = Counter()  # tile -> times it moved

    def tile_name(self, i: int, moves: int | None = None) -> str:
        """The Ray actor name of tile ``i`` (in namespace ``NAMESPACE``); ``@k`` once it has moved k times."""
        k = self._moves[i] if moves is None else moves
        return f"{self.name}/tile-{i}" + (f"@{k}" if k else "")

    def spawn(self, tiling: Tiling, device: DeviceSpec, cost_only: bool, executor: str) -> None:
        if not ray.is_initialized():
            start_local_ray()
        nodes = list(self.options.nodes or self._alive_nodes())
        n = len(tiling)
        where = [nodes[i * len(nodes) // n] for i in range(n)]
        if not cost_only:
            _check_node_memory(tiling, device, where)
        self._setup = (tiling, device, cost_only, executor)
        self.actors = [self._actor(i, where[i], where.count(where[i])) for i in range(n)]
        self._nodes = ray.get([a.node.remote() for a in self.actors])
        self._wire(list(range(n)))

    def _actor(self, i: int, node: str, sharing: int, moves: int = 0) -> Any:
        """Start tile ``i``'s actor on ``node``, where ``sharing`` tiles share the node's threads."""
        tiling, device, cost_only, executor = self._setup
        cpus = {n["NodeID"]: n["Resources"].get("CPU", 1.0) for n in ray.nodes() if n["Alive"]}
        strategy = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
        opts = ray.remote(TileActor).options(num_cpus=self.options.num_cpus, scheduling_strategy=strategy,
                                             name=self.tile_name(i, moves), namespace=NAMESPACE)
        threads = int(self.options.num_cpus) or int(cpus.get(node, 1.0) // sharing)
        return opts.remote(i, tiling.mesh.shape, tiling.tiles, device, cost_only, executor, threads, tiling.region,
                           tiling.origins, self.options.pin)

    def _wire(self, fresh: list[int]) -> None:
        """Connect every tile to every other (after a move, only the pairs with a ``fresh`` actor get new sockets)."""
        sockets = self._listen() if self.options.direct else None
        wired = ray.get([a.connect.remote(self.actors, self._nodes, sockets, fresh) for a in self.actors])
        incoming = Counter(j for dests, _ in wired for j in dests)
        unreachable = [why for _, whys in wired for why in whys]
        if unreachable:
            warnings.warn(f"messages go as Ray actor calls, several times slower, on {len(unreachable)} links from a "
                          f"tile to a tile on another node whose TCP port it could not reach (let the nodes connect to "
                          f"each other on any port): {'; '.join(unreachable[:3])}", RuntimeWarning, stacklevel=2)
        ray.get([a.seal.remote(incoming[i]) for i, a in enumerate(self.actors)])

    def _listen(self) -> list[Address]:
        """Where each tile listens for its peers (on TCP too where the wafer spans nodes)."""
        tcp = len(set(self._nodes)) > 1
        return ray.get([a.listen.remote(tcp) for a in self.actors])

    def move_start(self, tiles: list[int], node: str, keep: list[str]) -> Move:
        """Start ``tiles`` again on ``node`` and copy their buffers there, actor to actor, in the background (the
        old actors keep running protocols meanwhile); ``move_finish`` completes the move, sending what changed
        since, except in ``keep`` (buffers no protocol writes, such as weights).

        Raises:
            NodeMemoryError: ``node`` lacks the memory for the tiles it would hold.
        """
        tiling, device, cost_only, _ = self._setup
        where = [node if i in tiles else n for i, n in enumerate(self._nodes)]
        if not cost_only:
            _check_node_memory(tiling, device, where)
        sharing = where.count(node)
        new = {i: self._actor(i, node, sharing, self._moves[i] + 1) for i in tiles}
        copies = [new[i].call.remote("import_state", self.actors[i].call.remote("export_buffers", keep))
                  for i in tiles]
        return Move(list(tiles), node, new, copies, list(keep))

    def move_cancel(self, move: Move) -> None:
        """Stop the new actors of a move that will not complete."""
        for a in move.new.values():
            ray.kill(a)

    def move_ready(self, move: Move) -> bool:
        """Whether the background copies of ``move`` are done."""
        return len(ray.wait(move.copies, num_returns=len(move.copies), timeout=0)[0]) == len(move.copies)

    def move_finish(self, move: Move) -> None:
        """Wait for the background copies, send what changed since (between runs: entries of buffers, clocks, SRAM
        accounting), swap the new actors in, connect them, and stop the old ones."""
        self._get(dict(zip(move.tiles, move.copies)))
        rest = {i: move.new[i].call.remote("import_state", self.actors[i].call.remote("export_state", move.keep, False, True))
                for i in move.tiles}
        self._get(rest)
        old = [self.actors[i] for i in move.tiles]
        for i in move.tiles:
            self.actors[i] = move.new[i]
            self._nodes[i] = move.node
            self._moves[i] += 1
        self._wire(move.tiles)
        _stop(old)

    @staticmethod
    def _alive_nodes() -> list[str]:
        here = ray.get_runtime_context().get_node_id()
        alive = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        return [here] + [n for n in alive if n != here]

    def call(self, method: str, args: list[tuple]) -> list[Any]:
        refs = [a.call.remote(method, *arg) for a, arg in zip(self.actors, args)]
        return self._get(dict(enumerate(refs)))

    def call_some(self, method: str, args: dict[int, tuple]) -> dict[int, Any]:
        refs = {i: self.actors[i].call.remote(method, *a) for i, a in args.items()}
        return dict(zip(refs, self._get(refs)))

    def call_stream(self, method: str, batches: Iterable[dict[int, tuple]]) -> None:
        # the host builds and sends the next batches while the tiles take the first: up to STREAM_WINDOW in flight
        pending: deque[dict[int, Any]] = deque()
        for args in batches:
            pending.append({i: self.actors[i].call.remote(method, *a) for i, a in args.items()})
            if len(pending) == STREAM_WINDOW:
                self._get(pending.popleft())
        while pending:
            self._get(pending.popleft())

    def pids(self) -> list[int]:
        """The process id of each tile's actor."""
        return self._get({i: a.pid.remote() for i, a in enumerate(self.actors)})

    def _get(self, refs: dict[int, Any]) -> list[Any]:
        """``ray.get`` of each tile's reference, with a dead tile as ``TileLost`` and a tile's error as itself."""
        try:
            return ray.get(list(refs.values()))
        except ray.exceptions.RayError:
            errors = []
            for i, ref in refs.items():
                try:
                    ray.get(ref)
                    errors.append(None)
                except ray.exceptions.RayError as err:
                    errors.append(self._error(i, err))
            raise first_error(errors) from None

    def _error(self, tile: int, err: BaseException) -> BaseException:
        """The error a tile's call ended with: ``TileLost`` if its actor died, else what the tile raised."""
        if isinstance(err, ray.exceptions.RayActorError):
            reason = str(err).strip().splitlines()[0]
            node = self._nodes[tile] if tile < len(self._nodes) else "?"
            return TileLost(tile, node, f"{reason[:300]} (actor {self.tile_name(tile)})")
        return _unwrap(err)

    def run(self, path: str, run_id: int, routes: list[str], kwargs: dict[str, Any], io: list[dict[str, Any]]
            ) -> list[dict[str, Any]]:
        refs = [a.run.remote(path, run_id, routes, kwargs, part) for a, part in zip(self.actors, io)]
        pending = list(refs)
        stalled: dict[int, tuple] | None = None
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=self.options.stall_s)
            if not ready:  # nothing finished for a while: deadlocked if every running tile waits, twice, for the same
                waits = self._waits([i for i, r in enumerate(refs) if r in pending])
                if waits is not None and waits == stalled:
                    self._abort(run_id)
                    listed = "; ".join(f"tile {i} waits for {tag!r} from tile {src}" for i, (tag, src) in waits.items())
                    raise ProtocolError(f"deadlock: every running tile has waited {self.options.stall_s:g} s for a "
                                        f"message no tile sent ({listed})")
                stalled = waits
                continue
            stalled = None
            try:
                ray.get(ready[0])
            except ray.exceptions.RayError:
                self._abort(run_id)
                self._get(dict(enumerate(refs)))  # raises the error that ended the run
        return ray.get(refs)

    def _abort(self, run_id: int) -> None:
        ray.wait([a.abort.remote(run_id) for a in self.actors], num_returns=len(self.actors), timeout=30)

    def _waits(self, tiles: list[int]) -> dict[int, tuple] | None:
        """What each of ``tiles`` waits for, or None if one of them is running (or does not answer in time)."""
        refs = [self.actors[i].waiting_for.remote() for i in tiles]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=self.options.stall_s)
        if len(done) < len(refs):
            return None
        waits = dict(zip(tiles, (tuple(w) if w is not None else None for w in self._get(dict(zip(tiles, refs))))))
        return None if any(w is None for w in waits.values()) else waits

    def nodes(self) -> list[str]:
        return list(self._nodes)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
