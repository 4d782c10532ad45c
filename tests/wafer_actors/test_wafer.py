import os
import subprocess
import sys

import numpy as np
import pytest

from wafer_actors import DeviceSpecError, InvalidArgument, RoutingError, Spec, Wafer, preset
from wafer_actors.collectives import chain_allreduce, shift
from wafer_actors.fabric.ray import RayOptions, RayTransport
from wafer_actors.mesh import Mesh
from wafer_actors.protocol import protocol
from wafer_actors.transfer import Route, Transfer

DEV = preset("wse2").replace(name="test", alpha=1.5, beta=7.0)


@pytest.mark.parametrize(
    "proto, kwargs",
    [
        (shift, dict(axis="x", disp=1, wrap=True)),
        (shift, dict(axis="y", disp=-2, wrap=False)),
        (chain_allreduce, dict(axis="x", op="add")),
        (chain_allreduce, dict(axis="y", op="max", root=1)),
    ],
)
def test_cost_only_predicts_the_same_cycles_as_full_numerics(proto, kwargs):
    """Shapes alone drive the clocks: cost-only and full runs agree core by core."""
    a = np.random.default_rng(0).standard_normal((5, 8, 3)).astype(np.float32)
    clocks = []
    for cost_only in (False, True):
        with Wafer((5, 8), device=DEV, tiles=(2, 2), cost_only=cost_only) as w:
            w.load("v", a, Spec("y", "x", None))
            w.run(proto, buffer="v", **kwargs)
            w.run(proto, buffer="v", **kwargs)  # clocks carry over between runs
            clocks.append(w.clocks())
            assert (w.memory()[1] == 12).all()
    np.testing.assert_array_equal(clocks[0], clocks[1])
    assert clocks[0].max() > 0


def test_routing_limit_is_checked_before_any_work():
    """A protocol needing more routes than the device has fails before a single cycle passes."""
    few = DEV.replace(name="few-colours", routes_per_core=3)
    with Wafer((2, 7), device=few) as w:
        w.load("v", np.ones((2, 7), np.float32), Spec("y", "x"))
        with pytest.raises(RoutingError, match=r"core \(y=0, x=3\) needs 4 routing entries \(at least\), the device has 3"):
            w.run(chain_allreduce, buffer="v", axis="x")
        assert (w.clocks() == 0).all()
        np.testing.assert_array_equal(w.read("v"), np.ones((2, 7), np.float32))


def _many_routes(mesh: Mesh):
    """Routes yielded lazily, each one more entry on core (0, 0): the fourth overflows a 3-entry device; asking for
    more than five means the check read past the failure."""
    for i in range(5):
        yield Route(f"r{i}", (Transfer.build(f"t{i}", f"r{i}", mesh, ([0], [0]), ([0], [1])),))
    raise AssertionError("routes were read past the first core out of entries")


@protocol(routes=_many_routes)
async def _never_runs(tile) -> None:
    raise AssertionError("the protocol ran although its routes do not fit")


def test_routes_yielded_lazily_are_checked_as_they_come():
    """A protocol that yields its routes fails at the first core out of entries without building the rest (SUMMA's
    one route per source at 720 x 720 would not fit in the host's memory)."""
    with Wafer((2, 3), device=DEV.replace(name="few-colours", routes_per_core=3)) as w:
        with pytest.raises(RoutingError, match=r"core \(y=0, x=0\) needs 4 routing entries"):
            w.run(_never_runs)


@pytest.mark.parametrize("transport", ["local", "ray"])
def test_a_failing_tile_stops_the_others_with_its_own_error(request, transport):
    """When one tile fails mid-protocol, tiles waiting on it are aborted and the first error is raised."""
    if transport == "ray":
        request.getfixturevalue("ray_local")
    with Wafer((1, 7), device=DEV, tiles=(1, 3), transport=transport) as w:
        w.load("v", np.ones((1, 7), np.int32), Spec("y", "x"))
        with pytest.raises(DeviceSpecError, match=r"no compute rate for dtype 'int32'"):
            w.run(chain_allreduce, buffer="v", axis="x")
        w.load("f", np.ones((1, 7), np.float32), Spec("y", "x"))  # the wafer stays usable
        w.run(chain_allreduce, buffer="f", axis="x")
        np.testing.assert_array_equal(w.read("f"), np.full((1, 7), 7, np.float32))


def test_wafer_refuses_bad_requests_clearly():
    """Unknown tensors, reads of a cost-only wafer, non-protocols and unknown transports are named."""
    with pytest.raises(ValueError, match=r"transport must be 'local', 'ray' or a Transport, got 'mpi'"):
        Wafer((2, 2), transport="mpi")
    with Wafer((2, 2), cost_only=True) as w:
        w.load("v", np.ones((2, 2), np.float32), Spec("y", "x"))
        with pytest.raises(ValueError, match=r"cost-only wafer holds shapes"):
            w.read("v")
        with pytest.raises(KeyError, match=r"no tensor 'u'"):
            w.read("u")
        with pytest.raises(TypeError, match=r"run\(\) takes a Protocol"):
            w.run(lambda tile: None)


def test_stats_report_cycles_seconds_and_memory():
    """Run statistics convert cycles with the device clock and report the SRAM high-water mark."""
    with Wafer((4, 4), device=DEV, tiles=(2, 2)) as w:
        w.load("v", np.ones((4, 4, 10), np.float32), Spec("y", "x", None))
        s = w.run(shift, buffer="v", axis="y", disp=1)
    assert s.cycles == DEV.alpha + 40 / DEV.link_bytes_per_cycle
    assert s.seconds == pytest.approx(s.cycles / 1.1e9)
    assert s.sram_peak_bytes_max == 40
    assert s.protocol == "shift"
    assert s.host_wall_s > 0


def test_ray_placement_refuses_a_node_without_memory_for_its_tiles(ray_local):
    from wafer_actors.device import resolve

    huge = resolve("wse2").replace(sram_bytes=2**30)  # 1 GiB per core: 4 TiB for 64x64 cores
    with pytest.raises(MemoryError, match=r"would hold 4 tile\(s\) with up to 4096.0 GiB .* Ray gives it"):
        Wafer((64, 64), device=huge, tiles=(2, 2), transport="ray")
    Wafer((64, 64), device=huge, tiles=(2, 2), transport="ray", cost_only=True).shutdown()  # shapes only: no check


def test_many_ray_tiles_on_few_cores_start_without_warnings():
    """16 tile processes on a 2-CPU Ray instance: Ray would warn about worker startup concurrency at 8."""
    code = ("from wafer_actors import Wafer\nfrom wafer_actors.fabric.ray import start_local_ray\n"
            "start_local_ray(num_cpus=2)\n"
            "with Wafer((8, 8), tiles=(4, 4), transport='ray', cost_only=True) as w:\n    print(len(w.nodes()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["16"]
    assert "startup concurrency" not in out.stderr, out.stderr


def test_a_private_ray_instance_runs_tiles_without_the_processes_only_a_cluster_needs():
    """No autoscaler monitor, log monitor or dashboard head; tiles still start, run and stop, and so does Ray."""
    code = ("import psutil, ray\nfrom wafer_actors import Wafer\nfrom wafer_actors.fabric.ray import start_local_ray\n"
            "start_local_ray(num_cpus=2)\n"
            "with Wafer((4, 4), tiles=(1, 2), transport='ray', cost_only=True) as w:\n    print(len(w.nodes()))\n"
            "for p in psutil.Process().children(recursive=True):\n    try:\n"
            "        print(' '.join(p.cmdline()).replace(' ', '_'))\n"
            "    except psutil.Error:\n        pass\n"  # a worker that exited and is not reaped yet (a zombie)
            "ray.shutdown()\nprint(len(psutil.Process().children(recursive=True)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    tiles, *children, left = out.stdout.split()
    assert tiles == "2"
    assert any("raylet" in c for c in children) and any("gcs_server" in c for c in children)
    for gone in ("monitor.py", "log_monitor.py", "dashboard.py"):
        assert not any(gone in c for c in children), (gone, children)
    assert left == "0"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux scheduling policies")
def test_ray_tiles_run_every_thread_under_the_batch_policy(ray_local):
    """A tile's threads, those started after it (numba's, on its first compiled kernel) included, do not preempt the
    tile that wakes them."""
    with Wafer((8, 8), tiles=(1, 2), transport="ray") as w:
        x = np.arange(64, dtype=np.float32).reshape(8, 8, 1)
        w.load("x", x, Spec("y", "x", None))
        w.run(chain_allreduce, buffer="x", axis="x", op="add")  # runs the compiled line program on every tile
        for pid in w.transport.pids():
            policies = {os.sched_getscheduler(int(t)) for t in os.listdir(f"/proc/{pid}/task")}
            assert policies == {os.SCHED_BATCH}, (pid, policies)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the driver keeps the default


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="thread affinity")
def test_ray_tiles_sharing_a_node_run_on_an_even_share_of_its_cores(ray_local):
    """Every thread of a tile, numba's included, runs on the tile's share of the cores; the shares of the tiles on
    a node cover its cores, one core each at least, disjoint while the cores outnumber the tiles. ``pin=False``
    leaves every tile on all of them."""
    cores = os.sched_getaffinity(0)
    x = np.arange(64, dtype=np.float32).reshape(8, 8, 1)
    for tiles, pin in (((1, 2), True), ((1, 3), True), ((1, 2), False)):
        with Wafer((8, 8), tiles=tiles, transport=RayTransport(RayOptions(pin=pin))) as w:
            w.load("x", x, Spec("y", "x", None))
            w.run(chain_allreduce, buffer="x", axis="x", op="add")  # starts numba's threads on every tile
            shares = []
            for pid in w.transport.pids():
                threads = {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir(f"/proc/{pid}/task")}
                assert len(threads) == 1, (pid, threads)  # one share for all of a tile's threads
                shares.append(set(next(iter(threads))))
        if not pin:
            assert shares == [cores] * len(shares)
            continue
        assert all(share and share <= cores for share in shares) and set().union(*shares) == cores, shares
        assert sum(map(len, shares)) == len(cores) if len(cores) >= len(shares) else all(len(s) == 1 for s in shares)
        assert [min(s) for s in shares] == sorted(min(s) for s in shares), shares  # in tile order: neighbours close


def test_moving_tiles_is_refused_for_in_process_tiles_and_bad_arguments(ray_local):
    with Wafer((4, 4), tiles=(1, 2), transport="local") as w:
        with pytest.raises(InvalidArgument, match="moving tiles needs Ray tiles"):
            w.move_start([0], "node", [])
    with Wafer((4, 4), tiles=(1, 2), transport="ray") as w:
        with pytest.raises(InvalidArgument, match=r"tiles to move must be indices in \[0, 2\), got \[2\]"):
            w.move_start([2], w.nodes()[0], [])
        with pytest.raises(InvalidArgument, match="node 'nowhere' is not an alive Ray node"):
            w.move_start([1], "nowhere", [])


@pytest.mark.parametrize("transport", ["local", pytest.param("ray", marks=pytest.mark.ray)])
def test_a_run_carries_its_inputs_and_outputs_in_one_call_per_tile(transport, request):
    """``inputs``, ``reset`` and ``outputs`` travel with the run, no other call reaching a tile, and give what
    ``load``, ``reset_clocks`` and ``read`` around it give; the SRAM high-water comes back with it too."""
    if transport == "ray":
        request.getfixturevalue("ray_local")
    a = np.random.default_rng(4).standard_normal((6, 4)).astype(np.float32)  # rows over y, replicated over x
    with Wafer((6, 6), device=DEV, tiles=(2, 3)) as ref, Wafer((6, 6), device=DEV, tiles=(2, 3), transport=transport) as w:
        for wafer in (ref, w):
            wafer.load("v", np.zeros((6, 4), np.float32), Spec("y", None))
            wafer.run(chain_allreduce, buffer="v", axis="y")  # clocks that the reset must clear
        ref.load("v", a, Spec("y", None))
        ref.reset_clocks()
        want = ref.run(chain_allreduce, buffer="v", axis="x")
        calls = []
        for method in ("call", "call_some"):
            real = getattr(w.transport, method)
            setattr(w.transport, method, lambda *args, real=real: calls.append(args) or real(*args))
        got = w.run(chain_allreduce, buffer="v", axis="x", inputs={"v": (a, Spec("y", None))}, outputs=["v"], reset=True)
        assert calls == []
        np.testing.assert_array_equal(got.outputs["v"], ref.read("v"))
        assert (got.cycles, got.end, got.sram_peak_bytes_max) == (want.cycles, want.end, want.sram_peak_bytes_max)
    with Wafer((2, 2), device=DEV, cost_only=True) as w:
        w.alloc("v", (2, 4), np.float32, Spec("y", None))
        with pytest.raises(InvalidArgument, match="cost-only"):
            w.run(chain_allreduce, buffer="v", axis="x", outputs=["v"])


@pytest.mark.parametrize("transport", ["local", pytest.param("ray", marks=pytest.mark.ray)])
def test_a_tensor_loads_in_bands_of_core_rows_of_any_size(transport, request, monkeypatch):
    """The host sends a tensor in bands of the region's core rows of at most LOAD_BYTES (one row where a row is more),
    to tiles of uneven heights; a stacked one an entry at a time. Each band lands on its cores: the tensors read back
    whole, and the SRAM is charged once, whatever the bands."""
    import wafer_actors.wafer as wafer_module

    if transport == "ray":
        request.getfixturevalue("ray_local")
    rng = np.random.default_rng(8)
    flat = rng.standard_normal((5 * 3, 7 * 2)).astype(np.float32)
    stack = rng.standard_normal((4, 5 * 2, 7)).astype(np.float32)
    highs = set()
    # a core row: flat 7 cores x (3, 2) floats = 168 B, an entry of the stack 7 x (2, 1) floats = 56 B
    for load_bytes, calls in ((1, 3 + 4 * 3), (2 * 7 * 24, 2 + 4 * 1), (10**9, 1 + 4 * 1)):
        monkeypatch.setattr(wafer_module, "LOAD_BYTES", load_bytes)
        with Wafer((5, 7), device=DEV, tiles=(2, 3), transport=transport) as w:  # tiles of 3 and 2 core rows
            sent = []
            real = w.transport.call_stream
            monkeypatch.setattr(w.transport, "call_stream",
                                lambda m, batches: real(m, (sent.append(m) or args for args in batches)))
            w.load("flat", flat, Spec("y", "x"))
            w.load("stack", stack, Spec(None, "y", "x"), stacked=True)
            assert sent.count("put_part") == calls
            np.testing.assert_array_equal(w.read("flat"), flat)
            np.testing.assert_array_equal(w.read("stack"), stack)
            highs.add(tuple(w.memory()[1].ravel()))
    assert len(highs) == 1
