import numpy as np
import pytest

from tests.helpers import assert_same
from wafer_actors import Spec, Wafer, preset
from wafer_actors.collectives import allreduce
from wafer_actors.collectives.allreduce import default_group_num, tree_phases

DEV = preset("wse2").replace(name="test", alpha=1.0, beta=6.0)
CONFIGS = [
    dict(algo="ktree"),
    dict(algo="ktree", group_num=3),
    dict(algo="ktree", K=3),
    dict(algo="pipeline"),
    dict(algo="chain", root=2),
    dict(algo="ring"),
]


def run(a, mesh, *, tiles=(1, 1), transport="local", cost_only=False, **kwargs):
    with Wafer(mesh, device=DEV, tiles=tiles, transport=transport, cost_only=cost_only) as w:
        w.load("v", a, Spec("y", "x", None))
        s = w.run(allreduce, buffer="v", **kwargs)
        return (None if cost_only else w.read("v")), s, w.clocks()


@pytest.fixture(scope="module")
def block():
    return np.random.default_rng(5).standard_normal((7, 10, 6)).astype(np.float32)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("axis", ["x", "y"])
@pytest.mark.parametrize("op", ["add", "max"])
def test_every_algorithm_equals_numpy(block, config, axis, op):
    """K-tree, pipeline, chain and ring all leave the line's sum (or max) on every core."""
    ax = "yx".index(axis)
    ref = block.sum(ax, keepdims=True) if op == "add" else block.max(ax, keepdims=True)
    out, _, _ = run(block, (7, 10), tiles=(2, 3), axis=axis, op=op, **config)
    assert_same(out, np.broadcast_to(ref, block.shape), what=f"{config} {op} along {axis}", exact=(op == "max"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_tiling_and_cost_only_do_not_change_anything(block, config):
    """Bit-identical results and clocks for 1, 4 and 9 tiles; cost-only gives the same clocks."""
    base = run(block, (7, 10), axis="x", **config)
    for tiles in [(2, 2), (3, 3)]:
        out, s, clocks = run(block, (7, 10), tiles=tiles, axis="x", **config)
        np.testing.assert_array_equal(out, base[0])
        np.testing.assert_array_equal(clocks, base[2])
        assert s.cycles == base[1].cycles and s.relay_stages == base[1].relay_stages
    _, s, clocks = run(block, (7, 10), tiles=(2, 2), cost_only=True, axis="x", **config)
    np.testing.assert_array_equal(clocks, base[2])


def test_ray_transport_gives_the_in_process_result(ray_local, block):
    """The K-tree and the ring on Ray tile actors match the in-process run bit for bit."""
    for config in (dict(algo="ktree"), dict(algo="ring")):
        base = run(block, (7, 10), axis="x", **config)
        out, s, clocks = run(block, (7, 10), tiles=(2, 2), transport="ray", axis="x", **config)
        np.testing.assert_array_equal(out, base[0])
        np.testing.assert_array_equal(clocks, base[2])


@pytest.mark.parametrize("n", [16, 36, 64, 100])
def test_relay_stages_grow_like_sqrt_n_for_the_ktree_and_n_for_the_baselines(n):
    """On the critical path: K-tree about 2 sqrt(n)/2 relay stages, pipeline n - 1, ring 2 (n - 1)."""
    a = np.zeros((1, n, 4), np.float32)
    stages = {algo: run(a, (1, n), cost_only=True, axis="x", algo=algo)[1].relay_stages for algo in ("ktree", "pipeline", "ring")}
    assert stages["pipeline"] == n - 1
    assert stages["ring"] == 2 * (n - 1)
    assert stages["ktree"] <= np.sqrt(n) + 2


def test_ktree_routes_per_core_do_not_grow_with_the_mesh():
    """The K-tree needs at most 2K + 2 routing entries per core, whatever n is."""
    for k in (2, 3):
        used = [run(np.zeros((1, n, 1), np.float32), (1, n), cost_only=True, axis="x", algo="ktree", K=k)[1].routes_per_core_max for n in (16, 64, 144)]
        assert max(used) <= 2 * k + 2 and used[1] == used[2]


def test_default_group_count_minimises_relay_stages():
    """The default group count sits near sqrt(n), as WaferLLM's configs choose (18-20 at 360-420)."""
    assert default_group_num(360) in range(17, 22)
    assert default_group_num(420) in range(19, 23)
    phases = tree_phases(360, 2, None)
    assert len(phases) == 2 and len(phases[1]) == 1
    for n in [*range(1, 130), 660, 720]:  # the fewest stages of the phases actually built, searched over every count
        def stages(g):
            first = tree_phases(n, 2, g)[0]
            return max(max(r, len(m) - 1 - r) for m, r in first) + g // 2, abs(g - n**0.5)
        assert default_group_num(n) == min(range(1, n + 1), key=stages), n


def test_bad_allreduce_arguments_name_the_valid_choices():
    """Unknown algorithm, bad K or group_num are refused before anything runs."""
    a = np.zeros((2, 4, 1), np.float32)
    with pytest.raises(ValueError, match=r"algo must be one of \('ktree', 'chain', 'pipeline', 'ring'\), got 'tree'"):
        run(a, (2, 4), axis="x", algo="tree")
    with pytest.raises(ValueError, match=r"group_num must be an integer in \[1, 4\]"):
        run(a, (2, 4), axis="x", algo="ktree", group_num=5)
    with pytest.raises(ValueError, match=r"K must be a positive integer, got 0"):
        run(a, (2, 4), axis="x", algo="ktree", K=0)
