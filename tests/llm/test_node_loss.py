"""A whole node removed mid-decode (its raylet and workers killed) on a 3-node Ray cluster of
its own: the lost tiles start again on the surviving nodes and the run is unchanged."""

from __future__ import annotations

import pytest
import ray

from .test_faults import run

pytestmark = pytest.mark.cluster


@pytest.fixture
def cluster_to_break():
    """A 3-node cluster of its own: a test removes one of its nodes."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_a_removed_node_moves_its_tiles_to_the_survivors(cluster_to_break):
    def remove_node(m):
        lost = m.wafers[0].nodes()[2]
        cluster_to_break.remove_node(next(n for n in cluster_to_break.worker_nodes if n.node_id == lost))

    base, base_cycles, _, _ = run("local")
    out, cycles, recoveries, nodes = run("ray", fault=remove_node)
    assert out.output_ids == base.output_ids
    assert cycles == base_cycles
    assert [r.tile for r in recoveries] == [2]
    assert recoveries[0].node not in nodes[0] and len(set(nodes[0])) == 2
