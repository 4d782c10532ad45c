import numpy as np
import pytest

from tests.helpers import assert_same
from wafer_actors import Spec, Wafer, preset
from wafer_actors.collectives import chain_allreduce

MESH = (6, 7)
TILINGS = [(1, 1), (2, 2), (3, 3)]
DEV = preset("wse2").replace(name="test", alpha=2.0, beta=5.0, link_bytes_per_cycle=2.0, fmacs_per_cycle={"float32": 4.0},
                            task_overhead=3.0)


def run_allreduce(a, *, tiles, transport, device=DEV, **kwargs):
    with Wafer(MESH, device=device, tiles=tiles, transport=transport) as w:
        w.load("v", a, Spec("y", "x", None))
        stats = w.run(chain_allreduce, buffer="v", **kwargs)
        return w.read("v"), stats, w.clocks()


def closed_form(n, root, block_bytes, elems, dev, broadcast=True):
    """Predicted cycles of the chain allreduce when every clock starts at 0.

    Each side of the root is a chain of k streaming relays: its stream is complete at the
    root after k (alpha + beta) + M, where M = max(B/w, E) is the time to stream (or
    combine, E = elems / rate) one block. Both streams reach the root in the same step and
    it takes them at once, but needs beta + 2E to combine both. The multicast then reaches
    the farthest core max(L, R) hops away and takes B/w to land. Before all that, every core
    switches to each phase's task (the chain, the multicast): one task overhead each.
    """
    a, b = dev.alpha, dev.beta
    d = block_bytes / dev.link_bytes_per_cycle
    e = elems / dev.rate("float32")
    m = max(d, e)
    low, high = root, n - 1 - root
    sides = [k for k in (low, high) if k > 0]
    t = max(max(sides) * (a + b) + m, b + len(sides) * e)
    return (1 + broadcast) * dev.task_overhead + t + (max(low, high) * a + d if broadcast else 0.0)


@pytest.fixture(scope="module")
def block():
    return np.random.default_rng(2).standard_normal(MESH + (5,)).astype(np.float32)


@pytest.mark.parametrize("axis", ["x", "y"])
@pytest.mark.parametrize("op", ["add", "max"])
def test_allreduce_equals_numpy(block, axis, op):
    """Every core ends with the sum (or max) of its line's blocks."""
    ax = "yx".index(axis)
    ref = np.sum(block, axis=ax, keepdims=True) if op == "add" else np.max(block, axis=ax, keepdims=True)
    out, _, _ = run_allreduce(block, tiles=(2, 2), transport="local", axis=axis, op=op)
    assert_same(out, np.broadcast_to(ref, block.shape), what=f"allreduce {op} along {axis}", exact=(op == "max"))


@pytest.mark.parametrize("transport", ["local", "ray"])
@pytest.mark.parametrize("tiles", TILINGS)
def test_allreduce_is_invariant_to_tiling_and_transport(request, block, tiles, transport):
    """Results (bit for bit) and per-core clocks do not depend on tiles or transport."""
    if transport == "ray":
        request.getfixturevalue("ray_local")
    with Wafer(MESH, device=DEV, tiles=tiles, transport=transport) as w:  # one wafer, its clocks reset per case
        for axis, op, root in [("x", "add", None), ("y", "add", 0), ("x", "max", 6)]:
            base = run_allreduce(block, tiles=(1, 1), transport="local", axis=axis, op=op, root=root)
            w.load("v", block, Spec("y", "x", None))
            w.reset_clocks()
            stats = w.run(chain_allreduce, buffer="v", axis=axis, op=op, root=root)
            out, clocks = w.read("v"), w.clocks()
            w.free("v")
            np.testing.assert_array_equal(out, base[0])
            np.testing.assert_array_equal(clocks, base[2])
            assert stats.cycles == base[1].cycles


@pytest.mark.parametrize("axis, n", [("x", 7), ("y", 6)])
@pytest.mark.parametrize("root", [0, 1, 2, 3, "last"])
@pytest.mark.parametrize("broadcast", [True, False])
def test_allreduce_cycles_match_the_closed_form(block, axis, n, root, broadcast):
    """Predicted cycles equal the closed form for every root position, with and without broadcast."""
    root = n - 1 if root == "last" else root
    _, stats, _ = run_allreduce(block, tiles=(2, 3), transport="local", axis=axis, root=root, broadcast=broadcast)
    assert stats.cycles == closed_form(n, root, 5 * 4, 5, DEV, broadcast)


def test_relay_stages_grow_with_the_chain_and_the_block_is_paid_once():
    """Doubling the block adds B/w per phase, not per relay: streaming, not store-and-forward."""
    small = np.ones(MESH + (4,), np.float32)
    big = np.ones(MESH + (8,), np.float32)
    dev = DEV.replace(fmacs_per_cycle={"float32": 100.0})
    _, s_small, _ = run_allreduce(small, tiles=(1, 1), transport="local", device=dev, axis="x", root=0)
    _, s_big, _ = run_allreduce(big, tiles=(1, 1), transport="local", device=dev, axis="x", root=0)
    per_phase = (8 - 4) * 4 / dev.link_bytes_per_cycle
    assert s_big.cycles - s_small.cycles == 2 * per_phase


def test_relay_stages_on_the_critical_path():
    """A chain from one end has n - 1 relay stages; from the middle half as many. The CE's only work on
    the path is switching to the two phases' tasks."""
    a = np.zeros(MESH + (1,), np.float32)
    _, end, _ = run_allreduce(a, tiles=(2, 2), transport="local", axis="x", root=0)
    _, mid, _ = run_allreduce(a, tiles=(2, 2), transport="local", axis="x", root=3)
    assert end.relay_stages == 6
    assert mid.relay_stages == 3
    assert end.compute_cycles == 2 * DEV.task_overhead and end.comm_cycles == end.cycles - end.compute_cycles


def test_allreduce_declares_four_routes_at_the_root():
    """The root is on the reduce and broadcast routes of both directions."""
    _, stats, _ = run_allreduce(np.zeros(MESH + (1,), np.float32), tiles=(1, 1), transport="local", axis="x")
    assert stats.routes_per_core_max == 4


def test_bad_allreduce_arguments_are_refused():
    """An unknown op or a root off the axis is a clear error."""
    a = np.zeros(MESH + (1,), np.float32)
    with pytest.raises(ValueError, match=r"op must be one of \('add', 'max'\), got 'mul'"):
        run_allreduce(a, tiles=(1, 1), transport="local", axis="x", op="mul")
    with pytest.raises(ValueError, match=r"root must be a core index along 'x' in \[0, 6\], got 7"):
        run_allreduce(a, tiles=(1, 1), transport="local", axis="x", root=7)
