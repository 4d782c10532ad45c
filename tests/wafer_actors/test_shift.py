import numpy as np
import pytest

from tests.helpers import assert_same
from wafer_actors import Spec, Wafer, preset
from wafer_actors.collectives import shift

MESH = (6, 7)
TILINGS = [(1, 1), (2, 2), (3, 3)]
DEV = preset("wse2").replace(name="test", alpha=2.0, beta=5.0, link_bytes_per_cycle=2.0)


def run_shift(a, *, tiles, transport, **kwargs):
    with Wafer(MESH, device=DEV, tiles=tiles, transport=transport) as w:
        w.load("v", a, Spec("y", "x", None))
        stats = w.run(shift, buffer="v", **kwargs)
        return w.read("v"), stats, w.clocks()


def numpy_shift(a, axis, disp, wrap):
    ax = "yx".index(axis)
    if wrap:
        return np.roll(a, disp, axis=ax)
    out = a.copy()
    n = a.shape[ax]
    src = [slice(None)] * a.ndim
    dst = [slice(None)] * a.ndim
    src[ax] = slice(max(0, -disp), n - max(0, disp))
    dst[ax] = slice(max(0, disp), n - max(0, -disp))
    out[tuple(dst)] = a[tuple(src)]
    return out


CASES = [("x", 1, False), ("x", -1, True), ("y", 1, True), ("y", -2, False), ("x", 3, True)]


@pytest.fixture(scope="module")
def block():
    return np.random.default_rng(1).standard_normal(MESH + (5,)).astype(np.float32)


@pytest.mark.parametrize("axis, disp, wrap", CASES)
def test_shift_equals_numpy(block, axis, disp, wrap):
    """A shift moves every block exactly as np.roll (or a clipped copy without wrap) does."""
    out, _, _ = run_shift(block, tiles=(2, 2), transport="local", axis=axis, disp=disp, wrap=wrap)
    assert_same(out, numpy_shift(block, axis, disp, wrap), what=f"shift {axis}{disp:+} wrap={wrap}")


@pytest.mark.parametrize("transport", ["local", "ray"])
@pytest.mark.parametrize("tiles", TILINGS)
def test_shift_is_invariant_to_tiling_and_transport(request, block, tiles, transport):
    """Outputs and per-core clocks are bit-identical for 1, 4 and 9 tiles, in-process and on Ray."""
    if transport == "ray":
        request.getfixturevalue("ray_local")
    base = {c: run_shift(block, tiles=(1, 1), transport="local", axis=c[0], disp=c[1], wrap=c[2]) for c in CASES}
    with Wafer(MESH, device=DEV, tiles=tiles, transport=transport) as w:  # one wafer, its clocks reset per case
        runs = {}
        for c in CASES:
            w.load("v", block, Spec("y", "x", None))
            w.reset_clocks()
            stats = w.run(shift, buffer="v", axis=c[0], disp=c[1], wrap=c[2])
            runs[c] = w.read("v"), stats, w.clocks()
            w.free("v")
    for c in CASES:
        out, stats, clocks = runs[c]
        np.testing.assert_array_equal(out, base[c][0])
        np.testing.assert_array_equal(clocks, base[c][2])
        assert stats.cycles == base[c][1].cycles
        assert (stats.counts["core_messages_remote"] > 0) == (tiles != (1, 1))


@pytest.mark.parametrize("axis, n", [("x", 7), ("y", 6)])
def test_shift_cycles_match_the_closed_form(block, axis, n):
    """One-hop shift: alpha + B/w; wrap-around: (n - 1) alpha + B/w; two hops share links: 2 alpha + 2 B/w."""
    dur = 5 * 4 / DEV.link_bytes_per_cycle
    _, s, _ = run_shift(block, tiles=(2, 2), transport="local", axis=axis, disp=1, wrap=False)
    assert s.cycles == DEV.alpha + dur
    _, s, _ = run_shift(block, tiles=(2, 2), transport="local", axis=axis, disp=-1, wrap=True)
    assert s.cycles == (n - 1) * DEV.alpha + dur
    _, s, _ = run_shift(block, tiles=(2, 2), transport="local", axis=axis, disp=2, wrap=False)
    assert s.cycles == 2 * DEV.alpha + 2 * dur


def test_shift_counts_messages_per_tile_pair():
    """A 1-hop x shift on 2x2 tiles sends one actor message from each west tile to its east tile."""
    a = np.zeros(MESH + (1,), np.float32)
    _, s, _ = run_shift(a, tiles=(2, 2), transport="local", axis="x", disp=1, wrap=False)
    assert s.counts["tile_messages"] == 2
    assert s.counts["core_messages_remote"] == 6  # one per row crosses the tile seam
    assert s.counts["core_messages_local"] == 6 * 6 - 6
    assert s.routes_per_core_max == 2  # receive from the west, send east: two settings


def test_bad_shift_arguments_are_refused():
    """A zero or too-long displacement is a clear error, raised before anything runs."""
    a = np.zeros(MESH + (1,), np.float32)
    with pytest.raises(ValueError, match=r"\|disp\| < 7, got 7"):
        run_shift(a, tiles=(1, 1), transport="local", axis="x", disp=7)
    with pytest.raises(ValueError, match=r"mesh axis must be 'y' or 'x', got 'z'"):
        run_shift(a, tiles=(1, 1), transport="local", axis="z", disp=1)
