"""Shared fixtures: Ray clusters are started once per test module, never per test."""

from __future__ import annotations

import pytest
import ray

from wafer_actors.fabric.ray import start_local_ray


@pytest.fixture(scope="module")
def ray_local():
    """A local single-node Ray instance with 2 CPUs."""
    start_local_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_cluster_3_nodes():
    """A head and two worker nodes, each a separate raylet on this machine."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
