"""A model's regions on one wafer: snake order, the hand-off and the prompt's crossing as transfers, whole runs."""

import numpy as np
import pytest

from llm.checkpoint import random_weights
from llm.config import LlamaConfig
from llm.engine import WaferLlama
from llm.reference import ReferenceModel
from llm.regions import _pairs, crossing_program, decode_regions, handoff_program, snake, span
from wafer_actors import RoutingError, Spec, Wafer
from wafer_actors.device import preset
from wafer_actors.protocol import protocol
from wafer_actors.transfer import Route

DEV = preset("wse2").replace(name="test", alpha=2.0, beta=5.0, link_bytes_per_cycle=2.0)
SHAPE = (4, 4)
ORIGINS = snake((8, 8), SHAPE, 3)  # east, then south
TINY = LlamaConfig("tiny", 3, 48, 80, 6, 2, 8, 100, 10000.0, 1e-5, 4096)  # GQA: 3 query heads per KV head


def reference_run(cfg, w, tokens):
    ref = ReferenceModel(cfg, w, len(tokens))
    return [ref.forward(t, i) for i, t in enumerate(tokens)]


def test_snake_order_makes_each_region_a_neighbour_of_the_next():
    assert snake((10, 9), (3, 4), 5) == ((0, 0), (0, 4), (3, 4), (3, 0), (6, 0))
    assert span((3, 4), snake((10, 9), (3, 4), 5)) == (9, 8)
    assert span(SHAPE, ORIGINS) == (8, 8) and ORIGINS == ((0, 0), (0, 4), (4, 4))


def _programs(mesh, shape, origins, kind):
    make = handoff_program if kind == "handoff" else crossing_program
    return [make(mesh, tuple(shape), a, b) for a, b in _pairs(tuple(map(tuple, origins)))]


def _routes(mesh, *, shape, origins, kind):
    return [Route(p.key, tuple(t for s in p.steps for t in s.transfers)) for p in _programs(mesh, shape, origins, kind)]


@protocol(routes=_routes)
async def hand_on(tile, *, shape, origins, kind):
    """Every region takes the buffer from the one before it and hands it to the next (no compute)."""
    with tile.on_wafer():
        programs = _programs(tile.tiling.mesh, shape, origins, kind)
        buf = "x" if kind == "handoff" else "xp"
        if tile.region:
            await tile.exchange(programs[tile.region - 1], buf)
        if tile.region < len(programs):
            await tile.exchange(programs[tile.region], buf)


@pytest.mark.parametrize("executor", ["step", "fused"])
@pytest.mark.parametrize("tiles", [(1, 1), (2, 2), (1, 2), (2, 1)])
def test_the_handoff_is_a_transfer_landing_at_its_closed_form(tiles, executor):
    """x (Spec("y"): row py holds block py) goes east, then south. East: each row's edge core multicasts along the
    row, so core (py, j) of region 1 holds it at (j + 1) alpha + B/w. South: block py goes down column py (h hops,
    from region 1's core (py, py)), then along row py (|j - py| hops) from a relay that took it whole."""
    x = np.random.default_rng(0).standard_normal(8).astype(np.float32)  # 2 elements per core: B = 8 bytes
    a, dur, h = DEV.alpha, 8 / DEV.link_bytes_per_cycle, SHAPE[0]
    with Wafer(span(SHAPE, ORIGINS), device=DEV, tiles=tiles, region=SHAPE, origins=ORIGINS, executor=executor) as w:
        w.regions[0].load("x", x, Spec("y"))
        for r in w.regions[1:]:
            r.alloc("x", x.shape, np.float32, Spec("y"))
        stats = w.run(hand_on, shape=SHAPE, origins=ORIGINS, kind="handoff")
        clocks = w.clocks()
        for r in w.regions:
            np.testing.assert_array_equal(r.read("x"), x)
            assert (r.blocks("x") == x.reshape(4, 1, 2)).all()  # every column of row py holds block py
    py, j = np.mgrid[0:4, 0:4]
    east = (j + 1) * a + dur
    down = np.diag(east) + h * a + dur  # region 2's core (py, py)
    south = down[py] + np.where(j == py, 0, np.abs(j - py) * a + dur)
    np.testing.assert_array_equal(clocks[0:4, 0:4], 0)  # sending costs the sender no time
    np.testing.assert_array_equal(clocks[0:4, 4:8], east)
    np.testing.assert_array_equal(clocks[4:8, 4:8], south)
    assert stats.cycles == south.max()
    assert stats.counts["core_bytes_local"] + stats.counts["core_bytes_remote"] == 2 * 16 * 8  # every core once each
    east_p, south_p = _programs(w.mesh, SHAPE, ORIGINS, "handoff")
    (t,) = east_p.steps[0].transfers
    np.testing.assert_array_equal(t.hops, t.dst_x - 3)
    assert (t.relays == 0).all() and (t.load == 1).all()  # one stream per row
    down_t, along_t = (s.transfers[0] for s in south_p.steps)
    assert (down_t.hops == h).all() and (down_t.load == 1).all() and len(along_t) == 12


def test_the_prompt_crosses_core_by_core_sharing_the_edge_links():
    """Every core's block goes to the same core of the next region: w (h) hops, and the w (h) flows of a row (column)
    all cross its edge link, so each is charged w (h) times B/w: region 1 lands at 4 alpha + 4 B/w everywhere, region
    2 at twice that."""
    xp = np.random.default_rng(1).standard_normal((8, 12)).astype(np.float32)  # 2 x 3 per core: B = 24 bytes
    a, dur = DEV.alpha, 24 / DEV.link_bytes_per_cycle
    for tiles, executor in (((1, 1), "step"), ((2, 2), "fused")):
        with Wafer(span(SHAPE, ORIGINS), device=DEV, tiles=tiles, region=SHAPE, origins=ORIGINS, executor=executor) as w:
            w.regions[0].load("xp", xp, Spec("y", "x"))
            for r in w.regions[1:]:
                r.alloc("xp", xp.shape, np.float32, Spec("y", "x"))
            w.run(hand_on, shape=SHAPE, origins=ORIGINS, kind="crossing")
            clocks = w.clocks()
            np.testing.assert_array_equal(w.regions[2].read("xp"), xp)
        np.testing.assert_array_equal(clocks[0:4, 4:8], 4 * a + 4 * dur)
        np.testing.assert_array_equal(clocks[4:8, 4:8], 2 * (4 * a + 4 * dur))


@pytest.mark.parametrize("regions, mesh", [(2, (5, 4)), (3, (3, 2))])
def test_models_on_several_regions_of_one_wafer_match_the_reference_on_any_tiling_and_executor(regions, mesh):
    """Logits of every step equal the NumPy reference's; cycles, hand-off cycles and per-region cycles are identical
    across tilings and executors, and the hand-off is part of the token's cycles."""
    w = random_weights(TINY, seed=5)
    tokens = list(np.random.default_rng(2).integers(0, TINY.vocab_size, 6))
    expected = reference_run(TINY, w, tokens)
    runs = []
    for tiles, executor in (((1, 1), "step"), ((1, 1), "fused"), ((1, 2), "fused"), ((2, 1), "step")):
        with WaferLlama(TINY, w, mesh=mesh, tiles=tiles, transport="local", tokens=len(tokens), regions=regions,
                        executor=executor) as m:
            assert len(m.wafer.regions) == regions and m.wafer.mesh.shape == span(mesh, m.origins)
            got = [m.step(t) for t in tokens]
        for (logits, _), want in zip(got, expected):
            np.testing.assert_allclose(logits, want, rtol=2e-4, atol=2e-4)
        runs.append([(st.cycles, st.handoff_cycles, tuple(st.region_cycles)) for _, st in got])
    assert all(r == runs[0] for r in runs), runs
    for cycles, handoff, per_region in runs[0]:
        assert handoff > 0 and cycles == pytest.approx(handoff + sum(per_region), rel=1e-12)


def test_a_handoff_that_needs_more_routing_entries_than_a_core_has_is_refused():
    """A limit that one region's decode fits (its busiest core's entries) but the hand-off's cores exceed."""
    w = random_weights(TINY, seed=5)
    with WaferLlama(TINY, w, mesh=(5, 4), transport="local", tokens=4) as m:
        kwargs = dict(plans=[p.as_kwargs() for p in m.plans], pos=0, shape=m.mesh, origins=m.origins)
        limit = int(m.wafer.run(decode_regions, inputs={"x": (np.zeros(m.placement.shape.dim, np.float32), Spec("y"))}, **kwargs)
                    .routes_per_core_max)
    with pytest.raises(RoutingError, match="handoff"):
        WaferLlama(TINY, w, mesh=(5, 4), transport="local", tokens=4, regions=2,
                   device=preset("wse2").replace(name="tight", routes_per_core=limit)).step(1)


def test_a_wafer_of_regions_refuses_what_only_a_region_can_do():
    """Tensors go through a region (each has its own); regions that overlap or leave the mesh are refused."""
    with Wafer((4, 8), region=SHAPE, origins=((0, 0), (0, 4))) as w:
        with pytest.raises(ValueError, match=r"holds 2 regions: place tensors through wafer.regions\[i\]"):
            w.load("x", np.zeros(8, np.float32), Spec("y"))
        w.regions[1].load("x", np.arange(8, dtype=np.float32), Spec("y"))
        with pytest.raises(KeyError, match="no tensor 'x' on the region"):
            w.regions[0].read("x")
        with pytest.raises(ValueError, match=r"region must be in \[0, 2\), got 2"):
            w.run(hand_on, region=2, shape=SHAPE, origins=((0, 0), (0, 4)), kind="handoff")
    for origins in (((0, 0), (0, 2)), ((0, 0), (0, 6))):
        with pytest.raises(ValueError, match=r"regions of 4x4 cores at .* overlap or leave the 4x8 mesh"):
            Wafer((4, 8), region=SHAPE, origins=origins)


def test_regions_on_ray_tiles_decode_as_in_process(ray_local):
    """Three regions of Ray tiles (two per region, messages between regions over their sockets): the same logits,
    bit for bit, and the same cycles as in-process tiles."""
    w = random_weights(TINY, seed=5)
    tokens = list(np.random.default_rng(3).integers(0, TINY.vocab_size, 4))
    runs = []
    for transport in ("local", "ray"):
        with WaferLlama(TINY, w, mesh=(3, 2), tiles=(1, 2), transport=transport, tokens=len(tokens), regions=3) as m:
            runs.append([m.step(t) for t in tokens])
    for (a, sa), (b, sb) in zip(*runs):
        np.testing.assert_array_equal(a, b)
        assert (sa.cycles, sa.handoff_cycles, sa.region_cycles) == (sb.cycles, sb.handoff_cycles, sb.region_cycles)
