"""The fabric across cluster nodes: three raylets on this machine, tiles on all of them."""

import numpy as np
import pytest

from wafer_actors import Spec, Wafer
from wafer_actors.collectives import chain_allreduce, shift

pytestmark = pytest.mark.cluster

MESH = (6, 6)


def run_both(transport, tiles):
    a = np.random.default_rng(3).standard_normal(MESH + (4,)).astype(np.float32)
    with Wafer(MESH, tiles=tiles, transport=transport) as w:
        w.load("v", a, Spec("y", "x", None))
        s1 = w.run(shift, buffer="v", axis="x", disp=1, wrap=True)
        s2 = w.run(chain_allreduce, buffer="v", axis="y", op="add")
        return a, w.read("v"), w.clocks(), (s1, s2), w.nodes()


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
