"""The fabric across cluster nodes: three raylets on this machine, tiles on all of them."""

import os
import socket
from collections import Counter

import numpy as np
import pytest

from wafer_actors import Spec, Wafer
from wafer_actors.collectives import chain_allreduce, shift
from wafer_actors.fabric.ray import RayOptions, RayTransport

pytestmark = pytest.mark.cluster

MESH = (6, 6)


def run_on(w: Wafer):
    """A shift along x and an allreduce along y on ``w``: the input, the output, the clocks and the two runs' stats."""
    a = np.random.default_rng(3).standard_normal(MESH + (4,)).astype(np.float32)
    w.load("v", a, Spec("y", "x", None))
    s1 = w.run(shift, buffer="v", axis="x", disp=1, wrap=True)
    s2 = w.run(chain_allreduce, buffer="v", axis="y", op="add")
    return a, w.read("v"), w.clocks(), (s1, s2)


def run_both(transport, tiles):
    with Wafer(MESH, tiles=tiles, transport=transport) as w:
        return (*run_on(w), w.nodes())


def test_tiles_spread_over_nodes_give_the_single_process_result(ray_cluster_3_nodes):
    """Tiles on three nodes give bit-identical blocks and clocks, and only y traffic crosses nodes."""
    a, out, clocks, (s1, s2), nodes = run_both("ray", (3, 3))
    assert len(set(nodes)) == 3
    assert nodes[0] == nodes[1] == nodes[2] and nodes[3] == nodes[4] == nodes[5]  # contiguous blocks per node
    _, out_local, clocks_local, (l1, l2), _ = run_both("local", (1, 1))
    np.testing.assert_array_equal(out, out_local)
    np.testing.assert_array_equal(clocks, clocks_local)
    assert (s1.cycles, s2.cycles) == (l1.cycles, l2.cycles)
    np.testing.assert_allclose(out, np.broadcast_to(np.roll(a, 1, axis=1).sum(0, keepdims=True), a.shape), rtol=1e-5)
    # each row of tiles shares a node: x traffic stays on it, y traffic crosses nodes
    assert s1.counts["tile_messages"] > 0 and s1.counts["node_messages"] == 0
    assert s2.counts["node_messages"] == s2.counts["tile_messages"] > 0


def tcp_links(pids: list[int]) -> Counter:
    """How many established TCP connections join each two of these processes (a set of two pids each), read from
    /proc: which sockets each process holds, and which two endpoints each socket joins."""
    owner = {}
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:  # closed meanwhile
                continue
            if target.startswith("socket:["):
                owner[target[8:-1]] = pid
    ends = []  # (local endpoint, remote endpoint, owning process) of each established socket of the processes
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.read().splitlines()[1:]:
                cols = row.split()
                if cols[3] == "01" and cols[9] in owner:  # ESTABLISHED
                    ends.append((cols[1], cols[2], owner[cols[9]]))
    local = {end: pid for end, _, pid in ends}
    return Counter(frozenset((pid, local[remote])) for end, remote, pid in ends if remote in local and end < remote)


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads the connections from Linux's /proc")
def test_tiles_on_different_nodes_talk_over_tcp_and_tiles_of_a_node_do_not(ray_cluster_3_nodes):
    """3x3 tiles, three per node: two TCP connections (one each way) join every two tiles on different nodes, none
    joins two tiles of a node (they use Unix sockets), and the blocks and clocks are the single-process ones; with
    ``direct=False`` (messages as actor calls) too."""
    _, out_local, clocks_local, _, _ = run_both("local", (1, 1))
    for direct in (True, False):
        with Wafer(MESH, tiles=(3, 3), transport=RayTransport(RayOptions(direct=direct))) as w:
            _, out, clocks, _ = run_on(w)
            np.testing.assert_array_equal(out, out_local)
            np.testing.assert_array_equal(clocks, clocks_local)
            if direct:
                pids, nodes = w.transport.pids(), w.nodes()
                apart = {frozenset((pids[i], pids[j])) for i in range(9) for j in range(i) if nodes[i] != nodes[j]}
                assert len(set(nodes)) == 3 and len(apart) == 27
                assert tcp_links(pids) == Counter(dict.fromkeys(apart, 2))


class _ClosedPort(RayTransport):
    """Tile 4 gives its peers a TCP port where nothing listens (as behind a firewall that refuses it)."""

    def _listen(self):
        addresses = super()._listen()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()
        addresses[4] = (addresses[4][0], closed)
        return addresses


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads the connections from Linux's /proc")
def test_a_tile_whose_tcp_port_is_unreachable_gets_actor_calls_and_a_warning(ray_cluster_3_nodes):
    """The six tiles on other nodes cannot reach tile 4's port: they say so in one warning and send it actor calls,
    every other two tiles on different nodes are joined by two sockets, and the run gives the single-process
    result."""
    _, out_local, clocks_local, _, _ = run_both("local", (1, 1))
    with pytest.warns(RuntimeWarning, match=r"on 6 links .* -> tile 4 at 127\.0\.0\.1:") as caught:
        w = Wafer(MESH, tiles=(3, 3), transport=_ClosedPort())
    assert len(caught) == 1
    with w:
        _, out, clocks, _ = run_on(w)
        np.testing.assert_array_equal(out, out_local)
        np.testing.assert_array_equal(clocks, clocks_local)
        pids, nodes = w.transport.pids(), w.nodes()
        links = tcp_links(pids)  # (Ray's actor calls run over TCP too: those to tile 4 add a connection of their own)
        for i in range(9):
            for j in range(i):
                if nodes[i] != nodes[j] and 4 not in (i, j):
                    assert links[frozenset((pids[i], pids[j]))] == 2
