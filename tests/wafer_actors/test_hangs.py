"""A protocol bug that leaves a receive unmatched fails with the tiles and messages it waits for, never hangs."""

from __future__ import annotations

import signal

import numpy as np
import pytest

from wafer_actors import ProtocolError, Wafer, preset
from wafer_actors.mesh import Mesh
from wafer_actors.protocol import protocol
from wafer_actors.transfer import Route, Transfer


def _westward(mesh: Mesh) -> Transfer:
    return Transfer.along(mesh, "x", "westward", "westward", np.arange(1, mesh.width), np.arange(mesh.width - 1))


def _routes(mesh: Mesh) -> list[Route]:
    return [Route("westward", (_westward(mesh),))]


@protocol(routes=_routes)
async def receive_without_send(tile) -> None:
    """The bug: every core waits for its east neighbour's block, which no core sends."""
    tile.alloc("v", (1,), "float32")
    await tile.recv(_westward(tile.tiling.mesh), "v")


@pytest.fixture
def no_hang():
    """Turn a hang into a failure after 60 s."""
    def fail(*_):
        raise AssertionError("the run hung")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("tiles", [(1, 1), (1, 2), (2, 2)])
def test_an_unmatched_receive_is_a_deadlock_error(tiles, no_hang):
    """In-process the deadlock is exact: every running tile waits for a message no tile has sent."""
    with Wafer((2, 4), device=preset("wse2"), tiles=tiles, transport="local") as w:
        with pytest.raises(ProtocolError, match=r"deadlock: every running tile waits .*tile 0 waits for 'westward#0' from tile"):
            w.run(receive_without_send)


@pytest.mark.ray
def test_an_unmatched_receive_fails_on_ray_too(ray_local, no_hang):
    """Ray tiles: a run where no tile finishes and every tile waits, twice in a row, for the same message fails."""
    from wafer_actors.fabric.ray import RayOptions, RayTransport

    transport = RayTransport(RayOptions(stall_s=1.0))
    with Wafer((2, 4), device=preset("wse2"), tiles=(1, 2), transport=transport) as w:
        with pytest.raises(ProtocolError, match=r"deadlock: every running tile has waited 1 s .*tile 0 waits for 'westward#0'"):
            w.run(receive_without_send)
