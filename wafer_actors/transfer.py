"""Transfers and routes: what moves over the fabric in one protocol step.

A ``Transfer`` is one step of one route: a set of flows, each carrying one core's block
to another core in the same row or column. Every destination core has exactly one
source; a source may feed several destinations in the same direction (a hardware
multicast: the routers on the way deliver to their core and forward at once).

A ``Route`` is a colour: the union of the paths of the transfers that use it. A router
holds one setting (input port -> output ports) per colour, so a route occupies one entry
per distinct setting on every router its paths touch: a core that receives on a route and
also sends on it (a relay) needs two, one that only forwards needs one. A core may not
need more entries than the device's ``routes_per_core``.

Contention: flows that share a directed link in one step are serialised, so a flow pays
``load x bytes / link_width`` where ``load`` is the largest number of streams on any link
of its path (a multicast stream counts once per link). A transfer counts its own flows'
streams; ``contend`` gives the transfers of one step the loads of all their streams together.
A program's ``Step`` applies it; a protocol body that sends several transfers before receiving
them and whose transfers could share a link must too (those here send theirs along different
axes or in opposite directions: shift's wrap, SUMMA's casts, Cannon's alignment, GEMM-T).

Everything here is a pure function of coordinates: the same for every tile, every tiling
and every process, which is what keeps reduction order and predicted cycles independent
of how the mesh is split into actors.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Iterable, Sequence

import numpy as np

from .errors import ProtocolError, RoutingError
from .mesh import Mesh, Tiling


@dataclass(frozen=True)
class Part:
    """The flows of a transfer from one tile to another, in a fixed order both sides agree on.

    Attributes:
        flows: indices into the transfer's flow arrays (destination row-major order).
        sources: flow indices of the distinct source cores, sorted by source position;
            the message carries one block per distinct source.
        inverse: for each flow, the position of its source in ``sources``.
    """

    flows: np.ndarray
    sources: np.ndarray
    inverse: np.ndarray


@dataclass(frozen=True)
class View:
    """A transfer as one tile sees it: what it sends to each tile and receives from each."""

    outgoing: dict[int, Part]
    incoming: dict[int, Part]


@dataclass(frozen=True, eq=False)
class Transfer:
    """One step of flows along a route.

    Build with ``Transfer.build``; the arrays are global (mesh coordinates).

    Attributes:
        key: a string naming this transfer in every process (message tags use it).
        route: the route (colour) the flows travel on.
        src_y, src_x, dst_y, dst_x: one entry per flow, sorted by destination (row-major).
        hops: links each flow crosses.
        relays: software relays on each flow's path (each costs beta).
        load: largest number of streams sharing a link on each flow's path (>= 1).
    """

    key: str
    route: str
    mesh: Mesh
    src_y: np.ndarray
    src_x: np.ndarray
    dst_y: np.ndarray
    dst_x: np.ndarray
    hops: np.ndarray
    relays: np.ndarray
    load: np.ndarray
    _views: dict = field(default_factory=dict, repr=False)
    line: "Transfer | None" = field(default=None, repr=False)  # built ``along``: the same flows on a one-line mesh

    @classmethod
    def build(
        cls,
        key: str,
        route: str,
        mesh: Mesh,
        src: tuple[Sequence[int], Sequence[int]],
        dst: tuple[Sequence[int], Sequence[int]],
        relays: Sequence[int] | None = None,
        load: np.ndarray | None = None,
        line: "Transfer | None" = None,
    ) -> "Transfer":
        """Validate flows given as (ys, xs) of sources and of destinations (``load``: each flow's, if known).

        Raises:
            ProtocolError: a flow leaves the mesh, is not along one axis, goes nowhere, or two
                flows end at the same core.
        """
        sy, sx = (np.asarray(a, dtype=np.int64).ravel() for a in src)
        dy, dx = (np.asarray(a, dtype=np.int64).ravel() for a in dst)
        rl = np.zeros_like(sy) if relays is None else np.asarray(relays, dtype=np.int64).ravel()
        if not (len(sy) == len(sx) == len(dy) == len(dx) == len(rl)):
            raise ProtocolError(f"transfer {key!r}: source, destination and relay arrays differ in length")
        for name, v, n in (("src_y", sy, mesh.height), ("dst_y", dy, mesh.height), ("src_x", sx, mesh.width), ("dst_x", dx, mesh.width)):
            if len(v) and (v.min() < 0 or v.max() >= n):
                raise ProtocolError(f"transfer {key!r}: {name} outside {mesh!r}")
        straight = (sy == dy) ^ (sx == dx)
        if not straight.all():
            i = int(np.flatnonzero(~straight)[0])
            raise ProtocolError(
                f"transfer {key!r}: flow ({sy[i]}, {sx[i]}) -> ({dy[i]}, {dx[i]}) is not a move along one mesh axis"
            )
        lin = dy * mesh.width + dx
        if len(lin) > 1 and not (np.diff(lin) > 0).all():
            order = np.argsort(lin, kind="stable")
            sy, sx, dy, dx, rl, lin = sy[order], sx[order], dy[order], dx[order], rl[order], lin[order]
            load = None if load is None else load[order]
        if len(lin) > 1 and (np.diff(lin) == 0).any():
            i = int(np.flatnonzero(np.diff(lin) == 0)[0])
            raise ProtocolError(f"transfer {key!r}: core ({dy[i]}, {dx[i]}) receives from two sources in one step")
        hops = np.abs(dy - sy) + np.abs(dx - sx)
        streams = _stream_ends(mesh, sy, sx, dy, dx)
        load = _link_load(mesh, sy, sx, dy, dx, streams) if load is None else load
        t = cls(key, route, mesh, sy, sx, dy, dx, hops, rl, load, line=line)
        t.__dict__["streams"] = streams
        return t

    @classmethod
    def along(cls, mesh: Mesh, axis: str, key: str, route: str, src: np.ndarray, dst: np.ndarray,
              relays: np.ndarray | None = None) -> "Transfer":
        """Flows ``src[i] -> dst[i]`` (indices along ``axis``), repeated on every line of the other axis.

        Lines share no link, so the loads (and the routing entries, ``Route.entries``) are those
        of one line, worked out (and validated) on a mesh of one line (``line``) and repeated,
        already in destination order: no check or sort over the whole mesh.
        """
        src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
        one = Mesh(mesh.height, 1) if axis == "y" else Mesh(1, mesh.width)
        zero = np.zeros(len(src), dtype=np.int64)
        yx = (lambda a, line: (a, line)) if axis == "y" else (lambda a, line: (line, a))  # noqa: E731
        line = cls.build(key, route, one, yx(src, zero), yx(dst, zero), relays)
        rep = lambda a: _on_every_line(one, mesh, a)  # noqa: E731
        if axis == "y":
            cols = np.tile(np.arange(mesh.width), len(line))
            arrays = (rep(line.src_y), cols, rep(line.dst_y), cols)
        else:
            rows = np.repeat(np.arange(mesh.height), len(line))
            arrays = (rows, rep(line.src_x), rows, rep(line.dst_x))
        return cls(key, route, mesh, *arrays, rep(line.hops), rep(line.relays), rep(line.load), line=line)

    def __len__(self) -> int:
        return len(self.src_y)

    def subset(self, keep: np.ndarray, key: str) -> "Transfer":
        """The flows where ``keep`` is true, as a transfer of its own (cheaper than ``build``)."""
        idx = np.flatnonzero(keep)
        arrays = [a.take(idx) for a in (self.src_y, self.src_x, self.dst_y, self.dst_x, self.hops, self.relays)]
        if self.load.max(initial=0) <= 1:  # fewer streams cannot share a link either
            load = np.ones(len(arrays[0]), dtype=np.int64)
        else:
            load = _link_load(self.mesh, *arrays[:4])
        t = Transfer(key, self.route, self.mesh, *arrays, load)
        if not self.multicast:
            t.__dict__["multicast"] = False  # fewer flows cannot share a source either
        return t

    def link_streams(self) -> np.ndarray:
        """Streams on each directed link, ``[port (N, S, W, E), y, x]`` for the link leaving core (y, x): each carries
        the flow's block once (a multicast once per link), so times the block's bytes, the bytes per link. Not
        kept: a mesh-sized array per transfer would outgrow the host on large meshes."""
        if len(self) == 0:
            return np.zeros((4, *self.mesh.shape), dtype=np.int64)
        return _dense_loads(self.mesh, *self.streams)

    @cached_property
    def streams(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The flows as streams, one per (source, direction) to its farthest destination: (sy, sx, ey, ex)."""
        if self.line is not None and self.line.mesh.shape != self.mesh.shape:
            return _repeat_streams(self.mesh, self.line)
        return _stream_ends(self.mesh, self.src_y, self.src_x, self.dst_y, self.dst_x)

    @cached_property
    def multicast(self) -> bool:
        """Whether some core sends more than one flow."""
        if self.line is not None:
            return self.line.multicast
        lin = self.src_y * self.mesh.width + self.src_x
        return len(lin) > 0 and np.bincount(lin, minlength=self.mesh.size).max() > 1

    def router_configs(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (core, setting): the routing setting every router on a path needs.

        A setting is a role with its input and output ports: ``send`` (core -> link),
        ``recv`` (link -> core), ``tap`` (link -> core and onward, a multicast stop) or
        ``transit`` (link -> link). A router holds one setting per colour, so a core needing
        two settings of one route needs two entries (why CSL alternates colours by parity).
        """
        mesh = self.mesh
        sy, sx, ey, ex = self.streams
        n = np.abs(ey - sy) + np.abs(ex - sx) + 1  # cores on each stream's path
        stream = np.repeat(np.arange(len(n)), n)
        k = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        dy, dx = np.sign(ey - sy)[stream], np.sign(ex - sx)[stream]
        core = (sy[stream] + dy * k) * mesh.width + (sx[stream] + dx * k)
        out_port = _ports(sy, sx, ey, ex)[stream]
        in_port = out_port ^ 1  # travelling east enters from the west, and so on

        first, last = k == 0, k == n[stream] - 1
        if len(sy) == len(self.src_y):  # one flow per stream: it stops only at its end
            delivered = last
        else:  # a multicast stops where one of its stream's flows ends: at the flow's distance along the path
            ids = (sy * mesh.width + sx) * 4 + _ports(sy, sx, ey, ex)  # sorted (``_stream_ends``)
            of = np.searchsorted(ids, (self.src_y * mesh.width + self.src_x) * 4
                                 + _ports(self.src_y, self.src_x, self.dst_y, self.dst_x))
            delivered = np.zeros(len(stream), dtype=bool)
            delivered[(np.cumsum(n) - n)[of] + self.hops] = True
        role = np.select([first, last, delivered], [0, 1, 2], 3)
        ramp = 4
        setting = role * 25 + np.where(first, ramp, in_port) * 5 + np.where(last, ramp, out_port)
        return core, setting

    def view(self, tiling: Tiling, tile: int) -> View:
        """Return (and cache) the parts of this transfer that tile ``tile`` sends and receives."""
        cache_key = (tiling.key, tile)
        v = self._views.get(cache_key)
        if v is None and tiling.region == tiling.mesh.shape and len(tiling) == 1:  # one tile holds every core
            whole = {0: self._whole()} if len(self) else {}
            v = self._views[cache_key] = View(whole, whole)
        if v is None:
            src_t = tiling.owner[self.src_y, self.src_x]
            dst_t = tiling.owner[self.dst_y, self.dst_x]
            tiles = lambda t: np.flatnonzero(np.bincount(t, minlength=len(tiling)))  # noqa: E731  (sorted, distinct)
            outgoing = {int(t): self._part(np.flatnonzero((src_t == tile) & (dst_t == t))) for t in tiles(dst_t[src_t == tile])}
            incoming = {int(t): self._part(np.flatnonzero((dst_t == tile) & (src_t == t))) for t in tiles(src_t[dst_t == tile])}
            v = self._views[cache_key] = View(outgoing, incoming)
        return v

    def _whole(self) -> Part:
        """``_part`` of every flow; along an axis, the line's repeated (no sort over the whole mesh)."""
        every = np.arange(len(self))
        if self.line is None or self.line.mesh.shape == self.mesh.shape or not self.multicast:
            return self._part(every)
        one = self.line._part(np.arange(len(self.line)))
        k, u = len(self.line), len(one.sources)
        if self.line.mesh.height == 1:  # lines are rows: row r holds flows r k ... r k + k - 1
            r = np.arange(self.mesh.height)[:, None]
            return Part(every, (r * k + one.sources).ravel(), (r * u + one.inverse).ravel())
        x = np.arange(self.mesh.width)  # lines are columns: flow i of column x is i w + x, and so is a source
        return Part(every, (one.sources[:, None] * self.mesh.width + x).ravel(),
                    (one.inverse[:, None] * self.mesh.width + x).ravel())

    def _part(self, flows: np.ndarray) -> Part:
        lin = self.src_y[flows] * self.mesh.width + self.src_x[flows]
        if not self.multicast or len(lin) == 0 or np.bincount(lin, minlength=self.mesh.size).max() == 1:  # no multicast here
            return Part(flows, flows, np.arange(len(flows)))
        _, first, inverse = np.unique(lin, return_index=True, return_inverse=True)
        return Part(flows, flows[first], inverse.ravel())


_PORT_STEP = ((-1, 0), (1, 0), (0, -1), (0, 1))  # N, S, W, E as (dy, dx)
SETTINGS = 100  # distinct router settings: role x 25 + in port x 5 + out port (ports 0-3, 4 the core)


def _ports(sy, sx, dy, dx) -> np.ndarray:
    """Direction of travel of each flow: 0 N, 1 S, 2 W, 3 E."""
    return np.select([dy < sy, dy > sy, dx < sx], [0, 1, 2], 3)


def _stream_ends(mesh: Mesh, sy, sx, dy, dx) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Collapse flows into streams: one per (source, direction), reaching its farthest destination.

    Streams come out sorted by (source core, direction).
    """
    port = _ports(sy, sx, dy, dx)
    key = (sy * mesh.width + sx) * 4 + port
    dist = np.abs(dy - sy) + np.abs(dx - sx)
    order = np.argsort(key * (mesh.height + mesh.width) + dist, kind="stable")  # by key, farthest last
    key, dist = key[order], dist[order]
    last = np.flatnonzero(np.r_[key[1:] != key[:-1], True]) if len(key) else np.zeros(0, dtype=np.int64)
    ids, far = key[last], dist[last]
    src, port = np.divmod(ids, 4)
    y, x = np.divmod(src, mesh.width)
    step = np.array(_PORT_STEP)[port]
    return y, x, y + step[:, 0] * far, x + step[:, 1] * far


def _on_every_line(one: Mesh, mesh: Mesh, a: np.ndarray) -> np.ndarray:
    """Per flow of a one-line mesh's transfer (``one``, in destination order), the value of that flow on every
    line of ``mesh``, in the destination order of ``mesh``."""
    if one.height == 1:  # lines are rows: row after row
        return np.tile(a, mesh.height)
    return np.repeat(a, mesh.width)  # lines are columns: a flow's row on every column, then the next flow's


def _repeat_streams(mesh: Mesh, line: "Transfer") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The streams of ``line`` (a one-line mesh's transfer) repeated on every line of ``mesh``, in
    ``_stream_ends``' order (source row-major, then direction), without a sort."""
    sy, sx, ey, ex = line.streams
    if line.mesh.height == 1:  # lines are rows: the line's streams on row 0, 1, ...
        rows = np.repeat(np.arange(mesh.height), len(sy))
        return rows, np.tile(sx, mesh.height), rows, np.tile(ex, mesh.height)
    # lines are columns: a source's streams (one per direction, consecutive) on column 0, 1, ...
    w = mesh.width
    start = np.flatnonzero(np.r_[True, sy[1:] != sy[:-1]]) if len(sy) else np.zeros(0, dtype=np.int64)
    count = np.diff(np.r_[start, len(sy)])
    group = np.repeat(np.arange(len(start)), count)
    rank = np.arange(len(sy)) - start[group]
    pos = ((w * start[group] + rank)[:, None] + np.arange(w)[None, :] * count[group][:, None]).ravel()
    order, cols = np.empty(len(pos), dtype=np.int64), np.empty(len(pos), dtype=np.int64)
    order[pos], cols[pos] = np.repeat(np.arange(len(sy)), w), np.tile(np.arange(w), len(sy))
    return sy[order], cols, ey[order], cols


def _dense_loads(mesh: Mesh, sy, sx, ey, ex) -> np.ndarray:
    """Streams on each directed link, ``[port, y, x]`` for the link leaving core (y, x) toward port."""
    h, w = mesh.shape
    diff = np.zeros((4, h + 1, w + 1), dtype=np.int64)
    port = _ports(sy, sx, ey, ex)
    # the links a stream uses leave the cores from its source up to (not including) its end:
    # mark the first of those cores with +1 and the one past the last with -1, then cumsum
    vertical = port < 2
    along_s = np.where(vertical, sy, sx)
    along_e = np.where(vertical, ey, ex)
    first = np.where(port % 2 == 0, along_e + 1, along_s)  # N and W run toward lower indices
    past = np.where(port % 2 == 0, along_s + 1, along_e)
    ys_first, xs_first = np.where(vertical, first, sy), np.where(vertical, sx, first)
    ys_past, xs_past = np.where(vertical, past, sy), np.where(vertical, sx, past)
    np.add.at(diff, (port, ys_first, xs_first), 1)
    np.add.at(diff, (port, ys_past, xs_past), -1)
    loads = np.empty((4, h, w), dtype=np.int64)
    loads[:2] = np.cumsum(diff[:2, :h, :w], axis=1)
    loads[2:] = np.cumsum(diff[2:, :h, :w], axis=2)
    return loads


def _disjoint(sy, sx, ey, ex) -> bool:
    """Whether no two streams use one directed link (every link's load at most 1), without a mesh-sized array.

    A stream uses the links leaving the cores of an interval of its line toward its port;
    sorted by (port, line, first core), the intervals are disjoint if each ends before the
    next one of its line starts.
    """
    port = _ports(sy, sx, ey, ex)
    vertical = port < 2
    line = np.where(vertical, sx, sy)
    a, b = np.where(vertical, sy, sx), np.where(vertical, ey, ex)
    lo = np.where(port % 2 == 0, b + 1, a)  # N and W run toward lower indices
    hi = np.where(port % 2 == 0, a, b - 1)
    order = np.lexsort((lo, line, port))
    port, line, lo, hi = port[order], line[order], lo[order], hi[order]
    same = (port[1:] == port[:-1]) & (line[1:] == line[:-1])
    return not (same & (lo[1:] <= hi[:-1])).any()


def _link_load(mesh: Mesh, sy, sx, dy, dx, ends: tuple | None = None) -> np.ndarray:
    """For each flow, the largest number of streams sharing a directed link on its path (``ends``: its streams,
    if known)."""
    if len(sy) == 0:
        return np.zeros(0, dtype=np.int64)
    ends = _stream_ends(mesh, sy, sx, dy, dx) if ends is None else ends
    if _disjoint(*ends):
        return np.ones(len(sy), dtype=np.int64)
    return _path_max(_dense_loads(mesh, *ends), sy, sx, dy, dx)


def contend(transfers: Sequence[Transfer]) -> tuple[Transfer, ...]:
    """The transfers of one step, each flow's load counted over the streams of all of them: flows of different
    transfers (different routes) that share a directed link are serialised as those of one transfer are.

    Transfers whose streams share no link with another's come back as they are (the common case, checked
    without a mesh-sized array). Give it the transfers as they are sent (a ``subset`` counts its own flows
    again). A contended transfer keeps its one-line ``line`` (its flows, streams and routing entries, not its
    loads): transfers that all repeat one line along one axis contend as their lines do, the loads repeated.
    """
    live = [t for t in transfers if len(t)]
    if len(live) < 2:
        return tuple(transfers)
    if len({t.mesh for t in live}) == 1 and all(t.line is not None for t in live) and len({t.line.mesh for t in live}) == 1:
        # every transfer repeats one line's flows along the same axis: lines share no link, so each line contends
        # as the one-line mesh's flows do
        lines = dict(zip(map(id, live), contend([t.line for t in live])))
        return tuple(t if not len(t) or lines[id(t)] is t.line else
                     replace(t, load=_on_every_line(t.line.mesh, t.mesh, lines[id(t)].load)) for t in transfers)
    ends = [np.concatenate(parts) for parts in zip(*(t.streams for t in live))]
    if _disjoint(*ends):
        return tuple(transfers)
    loads = _dense_loads(live[0].mesh, *ends)
    out = []
    for t in transfers:
        load = _path_max(loads, t.src_y, t.src_x, t.dst_y, t.dst_x) if len(t) else t.load
        out.append(t if np.array_equal(load, t.load) else replace(t, load=load))
    return tuple(out)


def _path_max(loads: np.ndarray, sy, sx, dy, dx) -> np.ndarray:
    """For each flow, the largest of ``loads`` (``[port, y, x]``, streams per directed link) on its path."""
    n = np.abs(dy - sy) + np.abs(dx - sx)
    flow = np.repeat(np.arange(len(n)), n)
    k = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    port = _ports(sy, sx, dy, dx)[flow]
    step = np.array(_PORT_STEP)[port]
    per_link = loads[port, sy[flow] + step[:, 0] * k, sx[flow] + step[:, 1] * k]
    return np.maximum.reduceat(per_link, np.cumsum(n) - n)


@dataclass(frozen=True)
class Route:
    """A named route (colour) and the transfers that travel on it."""

    name: str
    transfers: tuple[Transfer, ...]
    at: tuple[int, int] = (0, 0)  # where the transfers' mesh (a region) lies on the mesh they are counted on

    def entries(self, mesh: Mesh) -> np.ndarray:
        """Routing entries this route needs on each core, ``[y, x]``: one per distinct setting.

        A route whose transfers all repeat one line's flows on every line of one axis needs, on
        each line, what it needs on a mesh of one line.
        """
        own = self.transfers[0].mesh if self.transfers else mesh
        if own != mesh:  # a region's route, counted on its wafer
            out = np.zeros(mesh.shape, dtype=np.int64)
            (y, x), (h, w) = self.at, own.shape
            out[y : y + h, x : x + w] = Route(self.name, self.transfers).entries(own)
            return out
        lines = [t.line for t in self.transfers]
        if lines and all(ln is not None and ln.mesh == lines[0].mesh for ln in lines):
            one = lines[0].mesh
            return np.broadcast_to(Route(self.name, tuple(lines)).entries(one), mesh.shape).copy()
        pairs = [t.router_configs() for t in self.transfers]
        if not pairs:
            return np.zeros(mesh.shape, dtype=np.int64)
        core = np.concatenate([c for c, _ in pairs])
        setting = np.concatenate([s for _, s in pairs])
        used = np.zeros(mesh.size * SETTINGS, dtype=bool)
        used[core * SETTINGS + setting] = True
        return np.bincount(np.flatnonzero(used) // SETTINGS, minlength=mesh.size).reshape(mesh.shape)


def check_routes(mesh: Mesh, routes: Iterable[Route], limit: int) -> tuple[np.ndarray, list[str]]:
    """Count routing entries per core and refuse a core that needs more than ``limit``.

    Routes are counted one at a time, so a protocol that yields its routes lazily fails as
    soon as some core runs out of entries.

    Returns:
        (int array ``[y, x]`` of entries used on each core, the route names).

    Raises:
        RoutingError: naming the first core (row-major) over the limit and its routes so far.
    """
    usage = np.zeros(mesh.shape, dtype=np.int64)
    seen: list[tuple[str, np.ndarray]] = []
    for route in routes:
        entries = route.entries(mesh)
        usage += entries
        seen.append((route.name, entries))
        over = np.argwhere(usage > limit)
        if len(over):
            y, x = (int(v) for v in over[0])
            names = tuple(f"{n} x{int(e[y, x])}" if e[y, x] > 1 else n for n, e in seen if e[y, x])
            raise RoutingError((y, x), names, limit, int(usage[y, x]))
    return usage, [n for n, _ in seen]
