import numpy as np
import pytest

from wafer_actors import Mesh, ProtocolError, RoutingError, Spec, Wafer, preset
from wafer_actors.mesh import Tiling
from wafer_actors.program import Program, Step
from wafer_actors.protocol import protocol
from wafer_actors.transfer import Route, Transfer, check_routes, contend

M = Mesh(3, 6)


def row_transfer(src, dst, key="t", route="r"):
    n = len(src)
    return Transfer.build(key, route, M, (np.zeros(n, int), src), (np.zeros(n, int), dst))


def test_neighbour_flows_have_no_contention():
    """A one-hop shift puts one stream on each link."""
    t = row_transfer([0, 1, 2, 3, 4], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(t.hops, 1)
    np.testing.assert_array_equal(t.load, 1)


def test_overlapping_flows_share_links():
    """Two-hop shifts overlap: each interior link carries two streams."""
    t = row_transfer([0, 1, 2, 3], [2, 3, 4, 5])
    np.testing.assert_array_equal(t.hops, 2)
    np.testing.assert_array_equal(t.load, 2)


def test_multicast_counts_once_per_link():
    """Destinations fed by one source in one direction share a single stream."""
    t = row_transfer([2, 2, 2, 2, 2], [0, 1, 3, 4, 5])
    np.testing.assert_array_equal(t.load, 1)
    np.testing.assert_array_equal(t.hops, [2, 1, 1, 2, 3])


def test_flows_are_sorted_by_destination():
    """Flow order is fixed by destination, whatever order the protocol listed them in."""
    t = row_transfer([3, 0], [4, 1])
    np.testing.assert_array_equal(t.dst_x, [1, 4])
    np.testing.assert_array_equal(t.src_x, [0, 3])


@pytest.mark.parametrize(
    "src, dst, match",
    [
        ((np.array([0]), np.array([0])), (np.array([1]), np.array([1])), r"not a move along one mesh axis"),
        ((np.array([0, 0]), np.array([0, 2])), (np.array([0, 0]), np.array([1, 1])), r"core \(0, 1\) receives from two sources"),
        ((np.array([0]), np.array([0])), (np.array([0]), np.array([6])), r"dst_x outside"),
        ((np.array([0]), np.array([2])), (np.array([0]), np.array([2])), r"not a move along one mesh axis"),
    ],
)
def test_bad_flows_are_protocol_errors(src, dst, match):
    """Diagonal, duplicate-destination, off-mesh and zero-length flows are refused."""
    with pytest.raises(ProtocolError, match=match):
        Transfer.build("bad", "r", M, src, dst)


def test_views_split_flows_between_tiles_and_dedupe_sources():
    """A tile sends one block per distinct source core, and the receiver sees the same parts."""
    t = row_transfer([2, 2, 2], [3, 4, 5])  # multicast from (0, 2) into the east tile
    tiling = Tiling(M, (1, 2))
    west, east = t.view(tiling, 0), t.view(tiling, 1)
    assert list(west.outgoing) == [1] and list(east.incoming) == [0]
    part = west.outgoing[1]
    assert len(part.sources) == 1
    np.testing.assert_array_equal(part.flows, east.incoming[0].flows)
    np.testing.assert_array_equal(part.inverse, [0, 0, 0])


def test_routes_take_one_entry_per_router_setting():
    """A path takes an entry on its source, every core it passes and its destination;
    a core that both receives and sends on one route needs two."""
    far = row_transfer([0], [4], route="far")
    usage = check_routes(M, [Route("far", (far,))], limit=24)[0]
    np.testing.assert_array_equal(usage[0], [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(usage[1:], 0)
    chain = row_transfer([0, 1, 2], [1, 2, 3], route="chain")  # cores 1 and 2 receive and send
    np.testing.assert_array_equal(check_routes(M, [Route("chain", (chain,))], limit=24)[0][0], [1, 2, 2, 1, 0, 0])
    cast = row_transfer([2, 2, 2], [3, 4, 5], route="cast")  # one multicast: taps at 3 and 4
    np.testing.assert_array_equal(check_routes(M, [Route("cast", (cast,))], limit=24)[0][0], [0, 0, 1, 1, 1, 1])


def test_too_many_routes_on_one_core_is_a_routing_error():
    """A core needing more entries than the device has is named with its routes."""
    routes = [Route(f"r{i}", (row_transfer([i], [5], route=f"r{i}"),)) for i in range(5)]
    with pytest.raises(RoutingError, match=r"core \(y=0, x=4\) needs 5 routing entries \(at least\), the device has 4: routes r0, r1, r2, r3, r4"):
        check_routes(M, routes, limit=4)
    relay = Route("relay", (row_transfer([0, 1], [1, 2], route="relay"),))
    with pytest.raises(RoutingError, match=r"core \(y=0, x=1\) needs 2 routing entries \(at least\), the device has 1: routes relay x2"):
        check_routes(M, [relay], limit=1)


def test_the_disjoint_streams_check_agrees_with_the_dense_link_loads():
    """``_disjoint`` (sorted intervals) says no link carries two streams exactly where the mesh-sized link loads
    it stands in for have a maximum of at most 1; random sets of straight flows, both outcomes occurring."""
    from wafer_actors.transfer import _dense_loads, _disjoint, _stream_ends

    rng = np.random.default_rng(0)
    mesh = Mesh(7, 9)
    seen = set()
    for _ in range(2000):
        n = int(rng.integers(1, 6))
        sy, sx, along_y = rng.integers(0, 7, n), rng.integers(0, 9, n), rng.integers(0, 2, n).astype(bool)
        dy = np.where(along_y, rng.integers(0, 7, n), sy)
        dx = np.where(along_y, sx, rng.integers(0, 9, n))
        moves = (dy != sy) | (dx != sx)
        if not moves.any():
            continue
        ends = _stream_ends(mesh, sy[moves], sx[moves], dy[moves], dx[moves])
        fast = _disjoint(*ends)
        assert fast == (_dense_loads(mesh, *ends).max() <= 1)
        seen.add(fast)
    assert seen == {True, False}


def test_along_takes_loads_and_routing_entries_from_one_line():
    """A pattern repeated on every line (multicasts, overlapping streams, relays) gets from its one-line mesh the same
    flows in the same order, loads, streams, multicast flag and one tile's parts (sources, their flows), its route
    the same entries per core, and two such transfers sent together the same contended loads, as the flows of all
    lines built and counted on the whole mesh."""
    rng = np.random.default_rng(7)
    contended = 0
    for _ in range(60):
        mesh = Mesh(int(rng.integers(1, 9)), int(rng.integers(1, 9)))
        axis = str(rng.choice(["x", "y"]))
        n, other = mesh.axis_size(axis), mesh.axis_size("y" if axis == "x" else "x")
        if n < 2:
            continue
        pair = []
        for key in ("a", "b"):
            dst = rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False)
            src = rng.integers(0, n, size=len(dst))
            src = np.where(src == dst, (dst + 1) % n, src)
            relays = rng.integers(0, 3, size=len(dst))
            fast = Transfer.along(mesh, axis, key, "r", src, dst, relays)
            lines = np.repeat(np.arange(other), len(src))
            s, d, r = np.tile(src, other), np.tile(dst, other), np.tile(relays, other)
            yx = (lambda a: (a, lines)) if axis == "y" else (lambda a: (lines, a))  # noqa: E731
            slow = Transfer.build(key, "r", mesh, yx(s), yx(d), r)
            assert fast.line is not None and slow.line is None
            for name in ("src_y", "src_x", "dst_y", "dst_x", "hops", "relays", "load"):
                np.testing.assert_array_equal(getattr(fast, name), getattr(slow, name), err_msg=name)
            for a, b in zip(fast.streams, slow.streams):
                np.testing.assert_array_equal(a, b)
            assert fast.multicast == slow.multicast
            every, one = slow.view(Tiling(mesh, (1, 1)), 0).outgoing, fast.view(Tiling(mesh, (1, 1)), 0).outgoing
            for name in ("flows", "sources", "inverse"):  # the parts of one tile, the fast one from the line's
                np.testing.assert_array_equal(getattr(one[0], name), getattr(every[0], name), err_msg=name)
            pair.append((fast, slow))
        np.testing.assert_array_equal(Route("r", tuple(f for f, _ in pair)).entries(mesh),
                                      Route("r", tuple(s for _, s in pair)).entries(mesh))
        for f, s in zip(contend(tuple(f for f, _ in pair)), contend(tuple(s for _, s in pair))):
            np.testing.assert_array_equal(f.load, s.load)
            contended += not np.array_equal(f.load, pair[0][0].load if f.key == "a" else pair[1][0].load)
    assert contended  # some pairs share links


def _crossing(mesh: Mesh, same_way: bool) -> Program:
    """One step of two transfers on routes of their own: (0, 0) -> (0, 3) east, and (0, 2) -> (0, 4) east (sharing
    the link from core 2 to core 3 with the first) or (0, 4) -> (0, 2) west (sharing none)."""
    src, dst = (2, 4) if same_way else (4, 2)
    one = Transfer.build("a:0", "a", mesh, ([0], [0]), ([0], [3]))
    two = Transfer.build("b:0", "b", mesh, ([0], [src]), ([0], [dst]))
    return Program(f"crossing:{same_way}", (Step((one, two)),))


def _crossing_routes(mesh: Mesh, *, same_way: bool) -> list[Route]:
    return [Route(t.route, (t,)) for t in _crossing(mesh, same_way).steps[0].transfers]


@protocol(routes=_crossing_routes)
async def crossing(tile, *, same_way: bool) -> None:
    await tile.exchange(_crossing(tile.tiling.mesh, same_way), "v")


def test_transfers_of_one_step_contend_for_a_shared_link():
    """Flows of two transfers (two routes) that cross one directed link in the same step share its bandwidth:
    each is charged 2 x B/w, so the 3-hop flow lands at 3 alpha + 2 B/w and the 2-hop one at 2 alpha + 2 B/w;
    the same flows in opposite directions share no link and land at 3 alpha + B/w and 2 alpha + B/w."""
    dev = preset("wse2").replace(name="test", alpha=2.0, beta=5.0, link_bytes_per_cycle=2.0)
    a = np.random.default_rng(0).standard_normal((1, 6, 5)).astype(np.float32)
    dur = 5 * 4 / dev.link_bytes_per_cycle
    for same_way, shared in ((True, 2), (False, 1)):
        for tiles in ((1, 1), (1, 2), (1, 3)):
            for executor in ("step", "fused"):
                with Wafer((1, 6), device=dev, tiles=tiles, transport="local", executor=executor) as w:
                    w.load("v", a, Spec("y", "x", None))
                    stats = w.run(crossing, same_way=same_way)
                    out, clocks = w.read("v"), w.clocks()
                where = (3, 4) if same_way else (3, 2)
                np.testing.assert_array_equal(out[0, where[0]], a[0, 0])
                np.testing.assert_array_equal(out[0, where[1]], a[0, 2 if same_way else 4])
                assert clocks[0, where[0]] == 3 * dev.alpha + shared * dur, (same_way, tiles, executor)
                assert clocks[0, where[1]] == 2 * dev.alpha + shared * dur, (same_way, tiles, executor)
                assert stats.cycles == 3 * dev.alpha + shared * dur


def test_contend_leaves_transfers_that_share_no_link_as_they_are():
    """``contend`` returns the very transfers when no link carries streams of two of them; otherwise each flow's
    load counts the streams of all of them (here the loads one transfer of all the flows has: no two flows share
    a source)."""
    one, two = row_transfer([0], [3], "a:0", "a"), row_transfer([2], [4], "b:0", "b")
    apart = row_transfer([4], [2], "b:0", "b")
    assert all(x is y for x, y in zip(contend((one, apart)), (one, apart)))
    both = contend((one, two))
    whole = row_transfer([0, 2], [3, 4])
    np.testing.assert_array_equal(np.concatenate([t.load for t in both]), whole.load)
    np.testing.assert_array_equal(whole.load, 2)


def test_streams_of_two_routes_from_one_source_contend():
    """A multicast stream counts once per link within its transfer, but the same source sending the same way on
    two routes (two colours) puts two streams on the link: both flows pay 2 x B/w."""
    one, two = row_transfer([1], [3], "a:0", "a"), row_transfer([1], [4], "b:0", "b")
    both = contend((one, two))
    np.testing.assert_array_equal(both[0].load, 2)
    np.testing.assert_array_equal(both[1].load, 2)
    np.testing.assert_array_equal(row_transfer([1, 1], [3, 4]).load, 1)  # one route: one multicast stream
