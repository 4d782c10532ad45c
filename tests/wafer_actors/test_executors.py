"""The fused executor against the step executor (the specification): every protocol, meshes of
every shape, tilings 1x1 to 3x3 and uneven, both transports. Values, per-core clocks and
critical-path records, SRAM, routes and core-message counts must be identical; only the
actor messages may differ, and only downward."""

from __future__ import annotations

import glob
import os
import tempfile
import weakref

import numpy as np
import pytest

from wafer_actors import Spec, Wafer, preset, program
from wafer_actors.collectives import allreduce, block_gemm, shift
from wafer_actors.collectives.allreduce import allreduce_routes
from wafer_actors.collectives.allreduce import program as ktree_program
from wafer_actors.collectives.allreduce import run_allreduce as allreduce_on_tile
from wafer_actors.collectives.block_gemm import (block_gemm_routes, gathered, gemm_t_skewed, mesh_gemm_skewed, skew,
                                                 skewed_plan)
from wafer_actors.errors import ProtocolError
from wafer_actors.fabric.ray import RayOptions, RayTransport
from wafer_actors.mesh import Mesh
from wafer_actors.ops import TensorShape, gemm, gemv
from wafer_actors.program import EXACT, Fused, Program, Step, _line_classes
from wafer_actors.protocol import protocol
from wafer_actors.tile import Tile
from wafer_actors.timing import GRID, on_grid
from wafer_actors.transfer import Route, Transfer

DEV = preset("wse2").replace(name="test", alpha=1.0, beta=6.0, call_overhead=2.5, map_overhead=3.0, task_overhead=7.0)
STATE = ("clock", "fwd_head", "relaying", "sent", "stages", "path_compute")
MESHES = [(6, 6), (7, 10), (9, 9), (1, 7), (7, 1)]
TILINGS = [(1, 1), (2, 1), (1, 3), (3, 3), (2, 3)]
ALLREDUCES = [
    dict(algo="ktree"), dict(algo="ktree", group_num=2), dict(algo="ktree", K=3), dict(algo="pipeline"),
    dict(algo="chain", root=0), dict(algo="ring"), dict(algo="ktree", broadcast=False),
]


def core_state(w: Wafer) -> dict[str, np.ndarray]:
    """Every core's timing state and SRAM high-water mark, assembled over the tiles."""
    parts = w.transport.call("flat_clocks", [()] * len(w.tiling))
    out = {}
    for k, name in enumerate(STATE):
        out[name] = w._assemble([p[k].reshape(r.shape) for p, r in zip(parts, w.tiling.rects)])
    out["sram_high"] = w.memory()[1]
    return out


def assert_same_run(step, fused, what: str) -> None:
    """Two (values, stats, core state) triples from the two executors are identical."""
    (v1, s1, c1), (v2, s2, c2) = step, fused
    for a, b in zip(v1, v2):
        np.testing.assert_array_equal(b, a, err_msg=f"{what}: values")
    for name in c1:
        np.testing.assert_array_equal(c2[name], c1[name], err_msg=f"{what}: per-core {name}")
    for field in ("cycles", "start", "end", "compute_cycles", "relay_stages", "routes_per_core_max", "sram_peak_bytes_max"):
        assert getattr(s2, field) == getattr(s1, field), f"{what}: {field}"
    for key in ("core_messages_local", "core_bytes_local", "core_messages_remote", "core_bytes_remote"):
        assert s2.counts[key] == s1.counts[key], f"{what}: {key}"
    assert s2.counts["tile_messages"] <= s1.counts["tile_messages"], what


def fits(mesh, tiles) -> bool:
    return tiles[0] <= mesh[0] and tiles[1] <= mesh[1]


def run_allreduce(a, mesh, tiles, executor, transport="local", **kwargs):
    with Wafer(mesh, device=DEV, tiles=tiles, transport=transport, executor=executor) as w:
        w.load("v", a, Spec("y", "x", None))
        s = w.run(allreduce, buffer="v", **kwargs)
        w.load("v", a * 2, Spec("y", "x", None))  # a second run on the same clocks
        s = w.run(allreduce, buffer="v", **kwargs)
        return [w.blocks("v")], s, core_state(w)


@pytest.mark.parametrize("config", ALLREDUCES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
def test_allreduce_fused_equals_step(config, mesh):
    rng = np.random.default_rng(sum(mesh))
    a = rng.standard_normal(mesh + (5,)).astype(np.float32)
    a[0, 0, 0] = -0.0  # signed zeros and infinities combine the same way too
    a[-1, -1, 1] = -np.inf
    for tiles in [t for t in TILINGS if fits(mesh, t)]:
        for axis in "xy":
            if config.get("group_num", 1) > mesh["yx".index(axis)] or config.get("root", 0) >= mesh["yx".index(axis)]:
                continue
            for op in ("add", "max"):
                what = f"{config} {op} along {axis} on {mesh} in {tiles} tiles"
                step = run_allreduce(a, mesh, tiles, "step", axis=axis, op=op, **config)
                assert_same_run(step, run_allreduce(a, mesh, tiles, "fused", axis=axis, op=op, **config), what)


def test_fused_batches_what_crosses_a_tile_edge():
    """Rows split over 2 tiles: fused, the flows of one step toward and away from the root that
    cross the edge go in one message (step by step, one per transfer); rows inside tiles send nothing."""
    a = np.random.default_rng(0).standard_normal((9, 8, 3)).astype(np.float32)
    step = run_allreduce(a, (9, 8), (3, 2), "step", axis="x")[1]
    fused = run_allreduce(a, (9, 8), (3, 2), "fused", axis="x")[1]
    assert fused.counts["steps_fused"] > 0 and step.counts["steps_fused"] == 0
    assert 0 < fused.counts["tile_messages"] < step.counts["tile_messages"]
    assert run_allreduce(a, (9, 8), (3, 1), "fused", axis="x")[1].counts["tile_messages"] == 0


def test_programs_that_repeat_on_every_line_run_line_by_line():
    """The allreduces above took the line-by-line loop (``Fused.lines``) on every tile of an uneven tiling; a
    transfer on one row only does not repeat on every line and takes the general loop (also held to the step
    executor above: shifts and GEMMs). A line program's loops read one row of blocks per source of each batch (the
    root's multicast to the cores of another tile is many flows of one source)."""
    mesh = Mesh(7, 10)
    one_row = Transfer.build("one-row", "one-row", mesh, ([0] * 9, range(9)), ([0] * 9, range(1, 10)))
    multicast = False
    with Wafer(mesh.shape, device=DEV, tiles=(2, 3), executor="fused") as w:
        for tile in w.transport.tiles:
            for axis in "xy":
                fused = Fused.build(ktree_program(mesh, axis, "ktree", 2, None, None, True, "add"), tile)
                assert fused.lines is not None
                for box in [*fused.inbox.values(), *(b for _, b in fused.outbox.values())]:
                    assert box.carries.sum() == len(box.first)  # one flow per distinct source reads its block
                    multicast |= len(box.wire) > len(box.first)
            fused = Fused.build(Program("one row", (Step((one_row,)),)), tile)
            assert fused.lines is None and (len(fused.src) > 0) == (tile.rect.y0 == 0)
    assert multicast


def _row_chain(mesh: Mesh) -> Program:
    """A streaming chain along row 0 only (so the general loop runs it, not the line-by-line one), then a multicast
    back along the row from its last core: relays forward what they took, and flows cross tile edges."""
    w = mesh.width
    chain = [Step((Transfer.build(f"chain{k}", "row-chain", mesh, ([0], [k]), ([0], [k + 1])),), op="add", stream=True)
             for k in range(w - 1)]
    back = Transfer.build("back", "row-back", mesh, ([0] * (w - 1), [w - 1] * (w - 1)), ([0] * (w - 1), range(w - 1)))
    return Program("row chain", (*chain, Step((back,), stream=True)))


def _row_chain_routes(mesh: Mesh, **_) -> list[Route]:
    return [Route("row-chain", tuple(t for s in _row_chain(mesh).steps[:-1] for t in s.transfers)),
            Route("row-back", _row_chain(mesh).steps[-1].transfers)]


@protocol(routes=_row_chain_routes)
async def row_chain(tile, *, buffer):
    await tile.exchange(_row_chain(tile.tiling.mesh), buffer)


@pytest.mark.parametrize("tiles", [(1, 3), (2, 2), (3, 3)], ids=lambda t: f"{t[0]}x{t[1]}")
def test_a_program_on_one_row_crossing_tile_edges_fused_equals_step(tiles):
    """The general loop's batches carry each source's departure (a relay's from the stream it took); the receiver's
    arrivals, clocks and records match the step executor's."""
    a = np.random.default_rng(3).standard_normal((5, 9, 4)).astype(np.float32)
    runs = []
    for executor in ("step", "fused"):
        with Wafer((5, 9), device=DEV, tiles=tiles, executor=executor) as w:
            w.load("v", a, Spec("y", "x", None))
            w.run(row_chain, buffer="v")
            s = w.run(row_chain, buffer="v")  # a second run on the clocks the first left
            runs.append(([w.blocks("v")], s, core_state(w)))
    assert runs[1][1].counts["tile_messages"] > 0
    assert_same_run(*runs, f"row chain in {tiles} tiles")
    v = runs[0][0][0].reshape(a.shape)  # each run leaves every core of row 0 its sum: the second, 9 times the first's
    np.testing.assert_allclose(v[0], np.broadcast_to(9 * a[0].sum(axis=0), v[0].shape), rtol=1e-5)
    np.testing.assert_array_equal(v[1:], a[1:])


@protocol(routes=lambda mesh, **_: allreduce_routes(mesh, axis="y"))
async def reduce_reallocate_reduce(tile, *, size):
    """Allreduce ``v`` along y; allocate ``v`` anew with ``size`` elements a core, each core's first sum plus the
    element's index; allreduce it again."""
    await allreduce_on_tile(tile, buffer="v", axis="y")
    first = tile.data("v").reshape(*tile.rect.shape, -1)[..., :1].copy()
    tile.alloc("v", (size,), "float32")
    tile.data("v")[...] = first + np.arange(size, dtype=np.float32)
    await allreduce_on_tile(tile, buffer="v", axis="y")


@pytest.mark.parametrize("tiles", [(1, 1), (2, 2)], ids=lambda t: f"{t[0]}x{t[1]}")
def test_a_collective_reads_a_buffer_allocated_anew_in_the_same_run(tiles):
    """The fused executor keeps what an exchange reads from run to run of its program (the buffer's array as
    ``[cores, elements]``, its costs): a buffer allocated anew under the same name, with another block, is read, not
    the array it replaced."""
    a = np.random.default_rng(5).integers(-4, 5, (6, 7, 3)).astype(np.float32)  # sums exact in float32
    with Wafer((6, 7), device=DEV, tiles=tiles) as w:
        w.load("v", a, Spec("y", "x", None))
        w.run(reduce_reallocate_reduce, size=5)
        got = w.blocks("v")
    col = a[..., 0].sum(axis=0)  # each column's first sum, on every core of the column
    expect = 6 * (col[None, :, None] + np.arange(5, dtype=np.float32))
    np.testing.assert_array_equal(got, np.broadcast_to(expect, (6, 7, 5)))


FREED: dict[int, bool] = {}  # tile -> whether the array of the buffer it freed was released


@protocol(routes=lambda mesh, **_: allreduce_routes(mesh, axis="y"))
async def reduce_then_free(tile):
    """Allreduce ``w`` along y, free it, and note whether its array is gone (in-process tiles only)."""
    await allreduce_on_tile(tile, buffer="w", axis="y")
    gone = weakref.ref(tile.data("w"))
    tile.free("w")
    FREED[tile.number] = gone() is None


def test_a_freed_buffer_leaves_nothing_behind_in_the_fused_executor():
    """What the fused executor keeps of an exchange (the buffer's array, reshaped) goes when the buffer is freed."""
    with Wafer((6, 7), device=DEV, tiles=(2, 2)) as w:
        w.alloc("w", (6, 7, 300), np.float32, Spec("y", "x", None))
        w.run(reduce_then_free)
    assert FREED == {0: True, 1: True, 2: True, 3: True}


@pytest.mark.parametrize("mesh", [(6, 6), (7, 10)], ids=lambda m: f"{m[0]}x{m[1]}")
@pytest.mark.parametrize("tiles", [(1, 1), (2, 1), (3, 3)], ids=lambda t: f"{t[0]}x{t[1]}")
def test_matrix_protocols_fused_equal_step(mesh, tiles):
    """Shift, MeshGEMV, MeshGEMM, Cannon, SUMMA (with and without relays) and GEMM-T."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal(mesh + (4,)).astype(np.float32)
    x, wv = rng.standard_normal(13).astype(np.float32), rng.standard_normal((13, 11)).astype(np.float32)
    p = mesh[0]
    ma, mb = rng.standard_normal((2 * p, 3 * p)).astype(np.float32), rng.standard_normal((3 * p, p)).astype(np.float32)
    bt = rng.standard_normal((p, 3 * p)).astype(np.float32)

    def runs(executor):
        out = {}
        with Wafer(mesh, device=DEV, tiles=tiles, executor=executor) as w:
            w.load("v", a, Spec("y", "x", None))
            s = w.run(shift, buffer="v", axis="x", disp=1, wrap=True)
            out["shift"] = [w.blocks("v")], s, core_state(w)
            y, s = gemv(w, x, wv)
            out["gemv"] = [y], s, core_state(w)
        if mesh[0] == mesh[1]:
            for algo, opts in (("meshgemm", {}), ("cannon", {}), ("summa", {}), ("summa", {"relay": True}),
                               ("gemm_t", {"transpose_b": True})):
                with Wafer(mesh, device=DEV, tiles=tiles, executor=executor) as w:
                    b = bt if algo == "gemm_t" else mb
                    c, s = gemm(w, ma, b, **({"algo": algo} | opts) if algo != "gemm_t" else opts)
                    out[f"{algo}{opts}"] = [c], s, core_state(w)
        return out

    step, fused = runs("step"), runs("fused")
    for name in step:
        assert_same_run(step[name], fused[name], f"{name} on {mesh} in {tiles} tiles")


@protocol(routes=lambda mesh, **_: block_gemm_routes(mesh))
async def skew_there_and_back(tile, *, charge: bool) -> None:
    """Skew ``a`` and ``b`` along y, ``a`` along x, undo the x skew; cores start apart when ``charge``."""
    if charge:  # every core a different clock, so the rounds' messages decide when cores go on
        tile.charge(tile.local(np.arange(tile.tiling.mesh.size).reshape(tile.tiling.mesh.shape) % 5 * 3.0), "float32")
    await skew(tile, ["a", "b"], axis="y")
    await skew(tile, ["a"], axis="x")
    tile.mark("skewed")
    await skew(tile, ["a"], axis="x", reverse=True)


@pytest.mark.parametrize("mesh", [(7, 7), (8, 8)], ids=lambda m: f"{m[0]}x{m[1]}")
def test_skew_rounds_timed_at_once_equal_step(mesh):
    """The skew's rounds (lines moving different distances, both ways round the INTERLEAVE ring, each line stopping
    when it has arrived) timed at once where the ring stays on the tile: values, clocks, records, SRAM and counts as
    step by step. The 1x3 tiling fuses one axis's skew only, 3x1 the other's; on those, every core of a tile may
    repeat its step while some of its lines have rounds to go."""
    rng = np.random.default_rng(4)
    a = rng.standard_normal(mesh + (3,)).astype(np.float32)
    b = 2 * a
    for tiles in ((1, 1), (1, 3), (3, 1)):
        for charge in (False, True):
            for cost_only in (False, True):
                out = {}
                for executor in ("step", "fused"):
                    with Wafer(mesh, device=DEV, tiles=tiles, executor=executor, cost_only=cost_only) as w:
                        w.load("a", a, Spec("y", "x", None))
                        w.load("b", b, Spec("y", "x", None))
                        s = w.run(skew_there_and_back, charge=charge)
                        out[executor] = [] if cost_only else [w.blocks("a"), w.blocks("b")], s, core_state(w)
                assert_same_run(out["step"], out["fused"], f"{mesh} {tiles} charge={charge} cost_only={cost_only}")
                if not cost_only:  # a and b both skewed along y only (a's x skew undone): b = 2a still, moved
                    got_a, got_b = (v.reshape(a.shape) for v in out["fused"][0])
                    np.testing.assert_array_equal(got_b, 2 * got_a)
                    assert not np.array_equal(got_a, a)


@protocol(routes=lambda mesh, **_: block_gemm_routes(mesh))
async def lines_both_ways(tile) -> None:
    """Ask ``shift_lines`` to move column 2 one place each way round its ring."""
    plan = skewed_plan(tile.tiling.mesh)
    until = np.zeros((2, tile.tiling.mesh.width), dtype=np.int64)
    until[:, 2] = 1
    tile.shift_lines([plan.full[("y", 1)], plan.full[("y", -1)]], "y", until, [12])


def test_shift_lines_refuses_a_line_moving_both_ways():
    """A skew's line moves one way; asked to move one both ways, ``shift_lines`` says so instead of timing one order."""
    with Wafer((6, 6), device=DEV, cost_only=True) as w:
        with pytest.raises(ProtocolError, match="both ways"):
            w.run(lines_both_ways)


def _product(a, ia, b, ib, c):
    c += gathered(a, ia) * gathered(b, ib)  # each core's share: the blocks it holds this step


@protocol(routes=lambda mesh, **_: block_gemm_routes(mesh))
async def block_gemms(tile, *, charge: bool, base: float = 0.0) -> None:
    """A MeshGEMM and a GEMM-T on kept-skewed operands (elementwise shares), cores starting apart when ``charge``,
    ``base`` cycles on."""
    tile.charge_cycles(base)
    if charge:
        tile.charge(tile.local(np.arange(tile.tiling.mesh.size).reshape(tile.tiling.mesh.shape) % 7 * 50.0), "float32")
    for name in ("c", "d"):
        tile.alloc(name, (1, 1, 3), "float32")
    await mesh_gemm_skewed(tile, a="a", b="b", c="c", product=_product, fmacs=10.0, calls=2, maps=1)
    await gemm_t_skewed(tile, a="c", b="b", c="d", product=_product, fmacs=7.0, calls=1, maps=2)


@pytest.mark.parametrize("mesh", [(7, 7), (8, 8), (12, 12)], ids=lambda m: f"{m[0]}x{m[1]}")
def test_gemm_steps_timed_at_once_equal_step(mesh):
    """The compute-shift steps of MeshGEMM and GEMM-T timed in one call where both rings stay on the tile (1x1), step
    by step where one leaves it (1x3, 3x1): values, clocks, records, SRAM and counts as the step executor's. In one
    call, the steps after one that moves every time alike are added at once (a wrong amount fails this test)."""
    rng = np.random.default_rng(5)
    a, b = (rng.standard_normal(mesh + (3,)).astype(np.float32) for _ in range(2))
    for tiles in ((1, 1), (1, 3), (3, 1)):
        for charge in (False, True):
            out = {}
            for executor in ("step", "fused"):
                with Wafer(mesh, device=DEV, tiles=tiles, executor=executor) as w:
                    w.load("a", a, Spec("y", "x", None))
                    w.load("b", b, Spec("y", "x", None))
                    s = w.run(block_gemms, charge=charge)
                    out[executor] = [w.blocks("c"), w.blocks("d")], s, core_state(w)
            assert_same_run(out["step"], out["fused"], f"{mesh} {tiles} charge={charge}")


@pytest.mark.parametrize("base", [0.0, EXACT - 1000.0], ids=["from 0", "leaving the exact range"])
def test_gemm_steps_played_where_cores_fall_into_step_equal_step(base, monkeypatch):
    """On 30x30 with cores starting apart, the compute-shift steps fall into step one core a step along each ring;
    timed at once, a step is played only at the cores still out of step, the others read as their last step
    repeated: the same run as step by step. Where the clocks would pass ``EXACT`` (sums no longer exact) timing at
    once declines and the steps run one by one."""
    rng = np.random.default_rng(8)
    a, b = (rng.standard_normal((30, 30, 3)).astype(np.float32) for _ in range(2))
    ran, at_once = [], Tile.run_steps
    monkeypatch.setattr(Tile, "run_steps", lambda tile, *args: ran.append(at_once(tile, *args)) or ran[-1])
    out = {}
    for executor in ("step", "fused"):
        with Wafer((30, 30), device=DEV, executor=executor) as w:
            w.load("a", a, Spec("y", "x", None))
            w.load("b", b, Spec("y", "x", None))
            s = w.run(block_gemms, charge=True, base=base)
            out[executor] = [w.blocks("c"), w.blocks("d")], s, core_state(w)
    assert ran == [base == 0.0] * 2
    assert out["step"][2]["clock"].max() > EXACT if base else out["step"][1].cycles > 30 * 50.0
    assert_same_run(out["step"], out["fused"], f"from {base}")


def test_gemm_steps_with_ring_orders_recomputed_equal_step(monkeypatch):
    """Where a tile has no room to keep a ring's block orders (a large mesh), each is computed at every step of every
    GEMM: the same run as step by step (the kept ones are the default, above)."""
    monkeypatch.setattr(block_gemm, "RING_ORDERS_BYTES", 0)
    rng = np.random.default_rng(6)
    a, b = (rng.standard_normal((8, 8, 3)).astype(np.float32) for _ in range(2))
    out = {}
    for executor in ("step", "fused"):
        with Wafer((8, 8), device=DEV, executor=executor) as w:
            w.load("a", a, Spec("y", "x", None))
            w.load("b", b, Spec("y", "x", None))
            s = w.run(block_gemms, charge=True)
            out[executor] = [w.blocks("c"), w.blocks("d")], s, core_state(w)
    assert_same_run(out["step"], out["fused"], "orders recomputed")


@pytest.mark.parametrize("mesh", [(6, 6), (7, 7), (4, 6)], ids=lambda m: f"{m[0]}x{m[1]}")
def test_cost_only_gemm_steps_timed_at_once_equal_step(mesh, monkeypatch):
    """Cost-only MeshGEMM and Cannon (several blocks per core on a non-square mesh) time their alignment rounds
    (lines moving different distances, both ways round) and their compute-shift steps in one call each where the
    rings stay on the tile (1x1): the same cycles, clocks, records and counts as step by step."""
    ran, at_once = [], Tile.run_steps
    monkeypatch.setattr(Tile, "run_steps", lambda tile, *args: ran.append(at_once(tile, *args)) or ran[-1])
    for algo in ("meshgemm", "cannon"):
        for tiles in ((1, 1), (2, 1)):
            out = {}
            for executor in ("step", "fused"):
                ran.clear()
                with Wafer(mesh, device=DEV, tiles=tiles, executor=executor, cost_only=True) as w:
                    _, s = gemm(w, TensorShape((20, 30), "float16"), TensorShape((30, 16), "float16"), algo=algo)
                    out[executor] = [], s, core_state(w)
            # one tile: the alignment and the steps at once; two: the steps declined on each (rings cross tiles)
            assert ran == [tiles == (1, 1)] * 2, (algo, tiles)
            assert_same_run(out["step"], out["fused"], f"{algo} on {mesh} in {tiles} tiles")


def test_ray_transport_fused_equals_step(ray_local):
    a = np.random.default_rng(2).standard_normal((7, 10, 4)).astype(np.float32)
    for tiles in ((2, 1), (2, 2)):
        base = run_allreduce(a, (7, 10), tiles, "step", axis="x")
        assert_same_run(base, run_allreduce(a, (7, 10), tiles, "fused", transport="ray", axis="x"), f"ray {tiles}")


@pytest.mark.parametrize("executor", ["step", "fused"])
def test_ray_tiles_on_one_node_talk_over_sockets_as_over_actor_calls(ray_local, executor):
    """Same-node messages over Unix sockets (the default) or actor calls: the same run, and the
    socket files are gone once the tiles are connected."""
    a = np.random.default_rng(3).standard_normal((7, 10, 4)).astype(np.float32)
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "wafer-*")))
    base = run_allreduce(a, (7, 10), (2, 2), executor, axis="y", algo="ktree", group_num=2)
    for direct in (True, False):
        run = run_allreduce(a, (7, 10), (2, 2), executor, transport=RayTransport(RayOptions(direct=direct)), axis="y",
                            algo="ktree", group_num=2)
        assert_same_run(base, run, f"direct={direct}")
        assert run[1].counts["tile_messages"] > 0
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "wafer-*"))) == before


@pytest.mark.parametrize("stops", [False, True], ids=["arrived batches run on", "every wait stops"])
@pytest.mark.parametrize("split", [False, True], ids=["alike", "split at the edge"])
@pytest.mark.parametrize("broadcast", [False, True])
def test_lines_alike_up_to_a_shift_are_timed_once_and_end_as_step_by_step(broadcast, split, stops, monkeypatch):
    """Lines (columns, then rows) whose timing state is one of three patterns shifted by a per-line time, and differs
    in parts no rule reads (the ``fwd_head`` of a core that relays nothing, a ``sent`` below the clock), are timed once
    per pattern by the fused executor: every core's state still ends as the step executor's, which times each line.
    Without the broadcast the roots never send and the chains' first cores take no stream: their ``sent`` and
    ``fwd_head`` must stay their own. Split: lines alike on one tile differ in what they take from the next, so
    their classes change between the stretch that sends a step and the one that receives it (the classes kept from
    one stretch to the next no longer hold, and the lines are sorted anew); alike, they hold across stretches.
    In-process, a tile mostly finds the batches a wait needs already there and runs on through it (one stretch
    takes them all): with every wait stopping, as where a neighbour is late, the stretches above run."""
    held = []  # per later stretch of a run on several tiles: whether the classes of the stretch before held
    stretch = program._stretch

    def record(*a):
        kept = stretch(*a)
        if kept:
            held.append(kept > 0)
        return kept

    monkeypatch.setattr(program, "_stretch", record)
    if stops:
        monkeypatch.setattr(Tile, "has_batch", lambda self, tag, src: False)
    mesh = (7, 9)
    rng = np.random.default_rng(5)
    grid = lambda a: np.round(a * 2**16) / 2**16  # noqa: E731  times on the timing grid
    a = rng.standard_normal(mesh + (3,)).astype(np.float32)
    for axis in "yx":
        lines, members = (mesh[1], mesh[0]) if axis == "y" else mesh
        pattern = rng.integers(0, 3, lines)
        clock0 = grid(rng.uniform(0, 500, (3, members)))
        sent0 = np.where(rng.random((3, members)) < 0.5, clock0 + grid(rng.uniform(1, 50, (3, members))), -1.0)
        shift_ = grid(rng.uniform(0, 1000, lines))
        clock = clock0[pattern] + shift_[:, None]
        sent = np.where(sent0[pattern] > 0, sent0[pattern] + shift_[:, None], clock - grid(rng.uniform(0, 9, clock.shape)))
        if split:  # the far ends of the lines follow other patterns: lines alike on one tile part at the edge
            far = rng.integers(0, 3, lines)
            clock[:, 4:] = (clock0[far] + shift_[:, None])[:, 4:]
            sent[:, 4:] = clock[:, 4:]
        fwd = grid(rng.uniform(0, 2000, clock.shape))
        if axis == "y":  # [line, member] -> [y, x]
            clock, sent, fwd = clock.T, sent.T, fwd.T
        for tiles in ((1, 1), (2, 1), (1, 3), (2, 3)):
            runs = []
            for executor in ("step", "fused"):
                with Wafer(mesh, device=DEV, tiles=tiles, executor=executor) as w:
                    for t in w.transport.tiles:
                        for name, value in (("clock", clock), ("sent", sent), ("fwd_head", fwd)):
                            getattr(t, name)[...] = t.local(value)
                    if executor == "fused" and tiles == (1, 1) and not split:  # the classifier sees the three patterns
                        t = w.transport.tiles[0]
                        fused = Fused.build(ktree_program(Mesh(*mesh), axis, "ktree", 2, 3, None, broadcast, "add"), t)
                        seg = fused.segment(0, 2, t.index)
                        reps, rep_of, shift = np.empty(lines, dtype=np.int64), np.empty(lines, dtype=np.int64), np.empty(lines)
                        n = _line_classes(*t.flat_clocks(), np.zeros(1), np.zeros(1), np.zeros(1, dtype=np.int64),
                                          np.zeros(1), lines, members, fused.lines.line_stride, fused.lines.member_stride,
                                          seg.taken, reps, rep_of, shift)
                        assert n == len(set(pattern)) and (pattern[rep_of] == pattern).all()
                        np.testing.assert_array_equal(shift, shift_ - shift_[rep_of])
                    w.load("v", a, Spec("y", "x", None))
                    s = w.run(allreduce, buffer="v", axis=axis, group_num=3, broadcast=broadcast)
                    runs.append(([w.blocks("v")], s, core_state(w)))
            assert_same_run(*runs, f"{axis} in {tiles} tiles, broadcast={broadcast}")
    if stops:
        assert (False in held) == split and True in held


def test_a_tile_runs_on_through_a_wait_whose_batches_have_arrived(monkeypatch):
    """A tile that reaches a wait with its batches there and no part owed sends nothing there and runs on through
    it in the same compiled call: the run and its messages are the ones of a tile that stops at every wait (as where
    a neighbour is late), in fewer calls."""
    a = np.random.default_rng(4).standard_normal((12, 12, 3)).astype(np.float32)
    stretch, runs, calls = program._stretch, {}, {}
    for stops in (False, True):
        calls[stops] = 0

        def record(*args, stops=stops):
            calls[stops] += 1
            return stretch(*args)

        with monkeypatch.context() as m:
            m.setattr(program, "_stretch", record)
            if stops:
                m.setattr(Tile, "has_batch", lambda self, tag, src: False)
            runs[stops] = run_allreduce(a, (12, 12), (2, 2), "fused", axis="x")
    assert_same_run(runs[False], runs[True], "runs on / stops")
    assert runs[False][1].counts["tile_messages"] == runs[True][1].counts["tile_messages"] > 0
    assert calls[False] < calls[True]


def test_times_below_the_exact_range_add_exactly_on_the_grid():
    """What the line classes rely on: sums of multiples of GRID below EXACT are exact, with room for what a
    program adds (a shifted copy of a schedule is the schedule shifted)."""
    rng = np.random.default_rng(7)
    a = on_grid(rng.uniform(0, EXACT, 10_000))
    b = on_grid(rng.uniform(0, EXACT, 10_000))
    assert ((a + b) - b == a).all() and ((a + b) - a == b).all()
    assert 2 * EXACT / GRID <= 2.0**53 and on_grid(10.81) % GRID == 0


def test_line_classes_read_what_the_rules_read():
    """Four lines of three cores, alike up to a shift; a ``fwd_head`` counts only where the core relays a stream, a
    ``sent`` only above the clock, the flows taken from another tile as times; a time out of the exact range is
    compared with no other line."""
    lines, members = 4, 3

    def classes(clock, fwd, relaying, sent, head=None):
        taken = np.arange(lines)[None, :] if head is not None else np.zeros((0, lines), dtype=np.int64)
        head = np.zeros(lines) if head is None else head
        reps, rep_of, shift = np.empty(lines, dtype=np.int64), np.empty(lines, dtype=np.int64), np.empty(lines)
        n = _line_classes(clock.ravel(), fwd.ravel(), relaying.ravel(), sent.ravel(), np.zeros(lines * members, dtype=np.int64),
                          np.zeros(lines * members), head, head + 4.0, np.zeros(lines, dtype=np.int64), np.zeros(lines), lines,
                          members, members, 1, taken, reps, rep_of, shift)
        return n, rep_of.tolist(), shift.tolist()

    base = np.array([0.0, 2.5, 7.0])
    clock = base + np.array([0.0, 10.0, 20.0, 30.0])[:, None]  # line l: base shifted by 10 l
    relaying = np.zeros((lines, members), dtype=bool)
    fwd, sent = np.random.default_rng(0).uniform(0, 99, (2, lines, members))
    sent = np.minimum(sent, clock)
    assert classes(clock, fwd, relaying, sent) == (1, [0, 0, 0, 0], [0.0, 10.0, 20.0, 30.0])
    relaying[:, 1] = True  # now fwd_head is read: only shifted copies are alike
    fwd[:, 1] = clock[:, 1] + np.array([1.0, 1.0, 2.0, 1.0])
    assert classes(clock, fwd, relaying, sent)[:2] == (2, [0, 0, 2, 0])
    relaying[:, 1] = False
    sent[3, 2] = clock[3, 2] + 1.0  # a send still in flight
    assert classes(clock, fwd, relaying, sent)[:2] == (2, [0, 0, 0, 3])
    assert classes(clock, fwd, relaying, np.minimum(sent, clock), head=np.array([5.0, 15.0, 26.0, 35.0]))[:2] == (2, [0, 0, 2, 0])
    clock[[1, 3]] += 2.0**37  # beyond the exact range: timed on their own, even though alike
    assert classes(clock, fwd, relaying, np.minimum(sent, clock))[:2] == (3, [0, 1, 0, 3])
