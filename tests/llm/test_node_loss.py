"""A whole node removed mid-decode (its raylet and workers killed) on a 3-node Ray cluster of
its own (the module's fixture, and this its only test): the lost tiles start again on the
surviving nodes and the run is unchanged."""

from __future__ import annotations

import pytest

from .test_faults import run

pytestmark = pytest.mark.cluster


def test_a_removed_node_moves_its_tiles_to_the_survivors(ray_cluster_3_nodes):
    def remove_node(m):
        lost = m.wafer.nodes()[2]
        ray_cluster_3_nodes.remove_node(next(n for n in ray_cluster_3_nodes.worker_nodes if n.node_id == lost))

    base, base_cycles, _, _ = run("local")
    out, cycles, recoveries, nodes = run("ray", fault=remove_node)
    assert out.output_ids == base.output_ids
    assert cycles == base_cycles
    assert [r.tile for r in recoveries] == [2]
    assert recoveries[0].node not in nodes and len(set(nodes)) == 2
