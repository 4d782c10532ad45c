"""Shared fixtures: Ray clusters are started once per test module, never per test."""

from __future__ import annotations

import numpy as np
import pytest
import ray


@pytest.fixture(scope="module")
def ray_local():
    """A local single-node Ray instance with 2 CPUs."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
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


def assert_same(actual: np.ndarray, expected: np.ndarray, *, what: str, exact: bool = True) -> None:
    """Compare an emulator result with its NumPy reference, labelling both sides on failure."""
    assert actual.shape == expected.shape, f"{what}: emulator shape {actual.shape} != NumPy shape {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: emulator dtype {actual.dtype} != NumPy dtype {expected.dtype}"
    if exact:
        np.testing.assert_array_equal(actual, expected, err_msg=f"{what}: emulator (actual) vs NumPy (desired)")
    else:
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5, err_msg=f"{what}: emulator (actual) vs NumPy (desired)")
