import numpy as np
import pytest

from wafer_actors import CoreMemoryError, LayoutError, ProtocolError, Spec, Wafer, preset
from wafer_actors.fabric.wire import Message, decode, encode
from wafer_actors.tile import Tile

SMALL = preset("wse2").replace(name="small", sram_bytes=1024)


def test_sram_is_charged_per_core_with_a_high_water_mark():
    """Buffers charge every core; freeing lowers use but not the high-water mark."""
    t = Tile(3, (4, 4), (2, 2), SMALL, cost_only=False)
    t.alloc("a", (16,), "float32")
    t.alloc("b", (8, 8), "float16")
    used, high = t.memory()
    assert (used == 64 + 128).all() and (high == 192).all()
    t.free("a")
    used, high = t.memory()
    assert (used == 128).all() and (high == 192).all()


def test_over_budget_names_core_buffer_and_bytes():
    """An allocation past the SRAM budget names the core (mesh coordinates), buffer and sizes."""
    t = Tile(3, (4, 4), (2, 2), SMALL, cost_only=False)  # tile 3 holds cores y, x in [2, 4)
    t.alloc("w", (200,), "float32")
    with pytest.raises(CoreMemoryError, match=r"core \(y=2, x=2\): buffer 'kv' needs 400 B, budget 1024 B, 800 B already in use"):
        t.alloc("kv", (100,), "float32")
    assert sorted(t.buffers) == ["w"] and (t.memory()[0] == 800).all()


def test_replacing_a_buffer_frees_the_old_one_first():
    """Loading a tensor again under the same name does not double-charge."""
    t = Tile(0, (2, 2), (1, 1), SMALL, cost_only=False)
    t.alloc("w", (200,), "float32")
    t.alloc("w", (250,), "float32")
    assert (t.memory()[0] == 1000).all()


def test_tensor_too_big_for_a_core_is_refused_on_load():
    """Wafer.load refuses a tensor whose block does not fit a core, before any protocol runs."""
    with Wafer((2, 2), device=SMALL) as w:
        with pytest.raises(CoreMemoryError, match=r"core \(y=0, x=0\): buffer 'big' needs 4096 B, budget 1024 B"):
            w.load("big", np.zeros((2, 2, 1024), np.float32), Spec("y", "x", None))
        with pytest.raises(LayoutError, match=r"not a multiple of 2"):
            w.load("odd", np.zeros((3, 2), np.float32), Spec("y", "x"))


def test_a_tile_speaks_global_coordinates():
    """Every core of an uneven 2x3 tiling of a 5x7 mesh is on exactly one tile, whose rows and columns name it and
    whose local indices find it in a global array."""
    grid = np.arange(35).reshape(5, 7) * 10
    seen = np.zeros((5, 7), dtype=int)
    for i in range(6):
        t = Tile(i, (5, 7), (2, 3), SMALL, cost_only=True)
        ly, lx = t.local_rows(np.arange(5)), t.local_cols(np.arange(7))
        assert list(np.flatnonzero(ly >= 0)) == list(t.rows) and list(np.flatnonzero(lx >= 0)) == list(t.cols)
        part = t.local(grid)
        for y in t.rows:
            for x in t.cols:
                seen[y, x] += 1
                assert part[ly[y], lx[x]] == grid[y, x] == 10 * (7 * y + x)
        assert t.local_rows(5) == -1 and t.local_cols(-1) == -1
    assert (seen == 1).all()


def test_compute_charges_cycles_at_the_device_rate():
    """A compute task of F FMACs in c vector instructions from m @maps advances the chosen cores by
    F / rate + c x call overhead + m x map overhead + one task switch."""
    dev = preset("wse2").replace(name="d", fmacs_per_cycle={"float32": 4.0}, call_overhead=3.0, map_overhead=5.0,
                                 task_overhead=7.0)
    t = Tile(0, (2, 2), (1, 1), dev, cost_only=False)
    t.charge(100, "float32", cores=np.array([[True, False], [False, True]]), calls=2, maps=1)
    np.testing.assert_array_equal(t.clocks(), [[43.0, 0.0], [0.0, 43.0]])
    t.switch_tasks(3)
    np.testing.assert_array_equal(t.clocks(), [[64.0, 21.0], [21.0, 64.0]])
    # a per-core task costed once (as decode does for attention, the same in every layer), charged twice
    cycles = t.task_cycles(np.array([[0.0, 4.0], [8.0, 40.0]]), "float32")
    np.testing.assert_array_equal(cycles, [[10.0, 11.0], [12.0, 20.0]])  # one call each
    t.charge_cycles(cycles)
    t.charge_cycles(cycles)
    np.testing.assert_array_equal(t.clocks(), [[84.0, 43.0], [45.0, 104.0]])
    np.testing.assert_array_equal(t.path_compute, [[84.0, 43.0], [45.0, 104.0]])


def test_cost_only_tiles_hold_no_data():
    """A cost-only tile charges SRAM but refuses to hand out values."""
    t = Tile(0, (2, 2), (1, 1), SMALL, cost_only=True)
    t.alloc("a", (16,), "float32")
    assert (t.memory()[0] == 64).all()
    with pytest.raises(ProtocolError, match=r"cost-only"):
        t.data("a")


def test_messages_round_trip_through_the_wire_format():
    """Encoding keeps dtype, shape and values of data and timings; every array is read in place, aligned."""
    times = (np.array([1.5, 2.0]), np.array([3.0, 4.0]), np.array([0, 3]), np.array([10.0, 0.5]))
    for tag in ("shift_x+:1#0", "t", "é" * 5):  # tags whose bytes leave the arrays at every offset mod 8
        m = Message(7, tag, 2, np.arange(6, dtype=np.float16).reshape(2, 3), *times)
        raw = encode(m)
        assert len(raw) % 8 == 0  # messages framed one after another stay aligned
        back = decode(raw)
        assert (back.run, back.tag, back.src) == (7, tag, 2)
        assert back.data.dtype == np.float16 and back.data.shape == (2, 3)
        np.testing.assert_array_equal(back.data, m.data)
        for got, sent in zip((back.head, back.tail, back.stages, back.compute), times):
            np.testing.assert_array_equal(got, sent)
            assert got.dtype == sent.dtype and got.flags.aligned
    back = decode(encode(Message(1, "t", 0, None, *times)))
    assert back.data is None and back.stages.tolist() == [0, 3]


def test_a_moved_tile_takes_what_changed_after_its_background_copy():
    """A tile copied while it runs on (export_buffers), then brought up to date between runs (export_state with
    changes): the copy holds the same buffers bit for bit, clocks and SRAM accounting, and only changed entries
    travel. A snapshot taken meanwhile is whole (restores on a fresh tile) and leaves the move's baseline alone."""
    dev = preset("wse2")
    old, new, fresh = (Tile(0, (4, 6), (1, 1), dev, cost_only=False) for _ in range(3))
    old.alloc("w", (3, 5), "float32")
    old.alloc("kv", (2, 7, 4), "float32", stacked=True)
    old.alloc("x", (), "float32")
    old.alloc("gone", (2,), "float32")
    rng = np.random.default_rng(0)
    for name in ("w", "kv", "x"):
        old.data(name)[...] = rng.standard_normal(old.data(name).shape)
    new.import_state(old.export_buffers(["w"]))
    kv = old.data("kv")
    kv[1, 2, 0, 3] = -kv[1, 2, 0, 3]  # one entry: a sign
    kv[0, 0, 1, 6, 2] = np.nan
    old.data("x")[2, 5] = -0.0 if old.data("x")[2, 5] == 0 else 0.0
    old.free("gone")
    old.alloc("fresh", (3,), "float32")
    old.data("fresh")[...] = 7.0
    old.clock[...] = rng.random(old.clock.shape)
    fresh.import_state(old.export_state(sparse=True))
    state = old.export_state(["w"], changes=True)
    assert "w" not in state["buffers"]
    _, where, values = state["buffers"]["kv"]
    assert len(values) == 2 and state["buffers"]["x"][0] == "changes" and len(state["buffers"]["x"][2]) == 1
    new.import_state(state)
    assert sorted(new.buffers) == sorted(old.buffers)
    for name in old.buffers:
        assert new.data(name).tobytes() == old.data(name).tobytes(), name
        assert fresh.data(name).tobytes() == old.data(name).tobytes(), name
        assert new.buffer(name).block == old.buffer(name).block
    assert np.moveaxis(new.data("kv"), 2, 0).flags.c_contiguous  # still stacked: a layer is one sweep
    for a, b in zip(new.memory() + (new.clock,), old.memory() + (old.clock,)):
        np.testing.assert_array_equal(a, b)


def test_a_sparse_state_sends_only_entries_that_are_not_zero():
    """A snapshot of a mostly empty cache: only the written entries travel, and it restores bit for bit."""
    t, fresh = (Tile(0, (3, 4), (1, 1), preset("wse2"), cost_only=False) for _ in range(2))
    t.alloc("kv", (2, 9, 4), "float32", stacked=True)
    t.data("kv")[0, 1, 1, 3] = [1.0, -0.0, 0.0, 2.5]  # -0.0 is not zero bytes: the entry travels
    t.data("kv")[2, 3, 0, 8, 1] = -0.0
    state = t.export_state(sparse=True)
    kind, *_, values = state["buffers"]["kv"]
    assert kind == "sparse" and len(values) == 2
    fresh.import_state(state)
    assert fresh.data("kv").tobytes() == t.data("kv").tobytes()
    assert np.moveaxis(fresh.data("kv"), 2, 0).flags.c_contiguous
