import numpy as np
import pytest

from wafer_actors import CoreMemoryError, ProtocolError, RoutingError, Spec, Wafer, preset
from wafer_actors.collectives.mesh_gemm import mesh_gemm
from wafer_actors.ops import TensorShape, gemm

CONFIGS = [
    dict(algo="meshgemm"),
    dict(algo="meshgemm", restore=True),
    dict(algo="cannon"),
    dict(algo="summa"),
    dict(algo="summa", relay=True),
    dict(transpose_b=True),
]
IDS = ["meshgemm", "meshgemm-restore", "cannon", "summa", "summa-relay", "gemm_t"]


def operands(m, k, n, transpose_b=False, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if transpose_b else (k, n)).astype(np.float32)
    return a, b, a @ (b.T if transpose_b else b)


SHAPES = [((4, 4), 16, 16, 16), ((5, 5), 23, 31, 17), ((3, 3), 7, 40, 2), ((2, 4), 9, 13, 10), ((6, 4), 30, 41, 25), ((3, 1), 5, 7, 4)]
CASES = [(c, *shape) for c in CONFIGS for shape in SHAPES if not (c.get("transpose_b") and shape[0][0] != shape[0][1])]  # GEMM-T: square only


@pytest.mark.parametrize("config, mesh, m, k, n", CASES)
def test_gemm_equals_numpy(config, mesh, m, k, n):
    """Every GEMM algorithm equals NumPy on square and non-square meshes, including sizes the mesh does not divide."""
    a, b, ref = operands(m, k, n, config.get("transpose_b", False))
    with Wafer(mesh, tiles=(min(2, mesh[0]), min(2, mesh[1]))) as wafer:
        c, _ = gemm(wafer, a, b, **config)
    np.testing.assert_allclose(c, ref, rtol=1e-5, atol=1e-5, err_msg=f"{config}: emulator (actual) vs NumPy (desired)")


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_gemm_is_invariant_to_tiling_and_cost_only(config):
    """1, 4 and 9 tiles give bit-identical results and clocks; cost-only gives the same clocks."""
    a, b, _ = operands(24, 18, 12, config.get("transpose_b", False), seed=1)
    runs = []
    for tiles in [(1, 1), (2, 2), (3, 3)]:
        with Wafer((6, 6), tiles=tiles) as wafer:
            c, s = gemm(wafer, a, b, **config)
            runs.append((c, s.cycles, wafer.clocks()))
    for c, cycles, clocks in runs[1:]:
        np.testing.assert_array_equal(c, runs[0][0])
        np.testing.assert_array_equal(clocks, runs[0][2])
    with Wafer((6, 6), tiles=(2, 2), cost_only=True) as wafer:
        _, s = gemm(wafer, TensorShape(a.shape), TensorShape(b.shape), **config)
        np.testing.assert_array_equal(wafer.clocks(), runs[0][2])


def test_meshgemm_on_ray_tiles_matches_in_process(ray_local):
    """MeshGEMM over Ray tile actors gives the in-process result and cycles bit for bit."""
    a, b, _ = operands(24, 18, 12, seed=2)
    with Wafer((6, 6)) as local, Wafer((6, 6), tiles=(2, 2), transport="ray") as remote:
        c1, s1 = gemm(local, a, b)
        c2, s2 = gemm(remote, a, b)
    np.testing.assert_array_equal(c1, c2)
    assert s1.cycles == s2.cycles and s2.counts["tile_messages"] > 0


def test_restore_leaves_the_operands_where_they_were_loaded():
    """With restore=True, A and B end on the cores that held them before the GEMM."""
    a, b, ref = operands(8, 8, 8, seed=3)
    with Wafer((4, 4), tiles=(2, 2)) as wafer:
        wafer.load("a", a, Spec("y", "x"))
        wafer.load("b", b, Spec("y", "x"))
        wafer.alloc("c", (8, 8), np.float32, Spec("y", "x"))
        wafer.run(mesh_gemm, a="a", b="b", c="c", restore=True)
        np.testing.assert_array_equal(wafer.read("a"), a)
        np.testing.assert_array_equal(wafer.read("b"), b)
        np.testing.assert_allclose(wafer.read("c"), ref, rtol=1e-5, atol=1e-5)


def per_step_cycles(algo, p):
    """Cycles per compute-shift step when compute is nearly free (1x1 blocks, fast cores)."""
    fast = preset("wse2").replace(name="fast", fmacs_per_cycle={"float32": 1e6}, call_overhead=0.0, map_overhead=0.0, task_overhead=0.0)
    with Wafer((p, p), device=fast, cost_only=True) as wafer:
        _, s = gemm(wafer, TensorShape((p, p)), TensorShape((p, p)), algo=algo)
    return s.cycles / p, s


def test_meshgemm_step_communication_stays_flat_while_cannons_grows():
    """MeshGEMM's two-hop rings keep each step's latency constant in P; Cannon's wrap-around grows with P."""
    mesh = [per_step_cycles("meshgemm", p)[0] for p in (4, 8, 16, 32)]
    cannon = [per_step_cycles("cannon", p)[0] for p in (4, 8, 16, 32)]
    assert max(mesh) / min(mesh) < 1.5
    assert cannon[-1] / cannon[0] > 4
    assert all(c > m for c, m in zip(cannon[1:], mesh[1:]))


def test_meshgemm_routes_are_constant_and_summa_runs_out():
    """MeshGEMM needs the same few routes at every P; SUMMA's grow with P until the device refuses."""
    used = [per_step_cycles("meshgemm", p)[1].routes_per_core_max for p in (4, 8, 16)]
    assert used[0] == used[1] == used[2] <= 24
    with Wafer((6, 6), cost_only=True) as wafer:
        _, small = gemm(wafer, TensorShape((6, 6)), TensorShape((6, 6)), algo="summa")
    assert small.routes_per_core_max > used[0]
    with Wafer((16, 16), cost_only=True) as wafer:
        with pytest.raises(RoutingError, match=r"core \(y=1, x=1\) needs 25 routing entries \(at least\), the device has 24: routes summa_x0\+, summa_x1-, summa_x1\+"):
            gemm(wafer, TensorShape((16, 16)), TensorShape((16, 16)), algo="summa")
        _, relayed = gemm(wafer, TensorShape((16, 16)), TensorShape((16, 16)), algo="summa", relay=True)
    assert relayed.routes_per_core_max <= 8


def test_summa_relays_pay_beta():
    """Relayed SUMMA broadcasts cost beta per relay on the way to the farthest core; MeshGEMM pays none."""
    p, cycles = 8, {}
    for beta in (0.0, 50.0):
        dev = preset("wse2").replace(name="b", beta=beta, fmacs_per_cycle={"float32": 1e6})
        with Wafer((p, p), device=dev, cost_only=True) as wafer:
            cycles[beta] = [gemm(wafer, TensorShape((p, p)), TensorShape((p, p)), algo=algo, relay=(algo == "summa"))[1].cycles for algo in ("summa", "meshgemm")]
    assert cycles[50.0][0] - cycles[0.0][0] >= (p - 2) * 50.0  # at least the first broadcast's p - 2 relays
    assert cycles[50.0][1] == cycles[0.0][1]


def test_gemm_refuses_bad_shapes_and_blocks():
    """GEMM-T on a non-square mesh, a mismatched inner size and unchained blocks are clear errors."""
    with Wafer((2, 4)) as wafer:
        with pytest.raises(ValueError, match=r"gemm_t needs a square mesh \(P x P cores\), got 2x4"):
            gemm(wafer, np.ones((4, 4), np.float32), np.ones((4, 4), np.float32), transpose_b=True)
    with Wafer((2, 2)) as wafer:
        with pytest.raises(ValueError, match=r"a is 4x3 but b is 4x4"):
            gemm(wafer, np.ones((4, 3), np.float32), np.ones((4, 4), np.float32))
        wafer.load("a", np.ones((4, 4), np.float32), Spec("y", "x"))
        wafer.load("b", np.ones((6, 4), np.float32), Spec("y", "x"))
        wafer.alloc("c", (4, 4), np.float32, Spec("y", "x"))
        with pytest.raises(ProtocolError, match=r"blocks do not chain: A \(2, 2\), B \(3, 2\), C \(2, 2\); expected A \(Mt, K/2\)"):
            wafer.run(mesh_gemm, a="a", b="b", c="c")
    with Wafer((2, 2), device=preset("wse2").replace(name="tiny", sram_bytes=192)) as wafer:  # A, B, C fit; the second buffers do not
        with pytest.raises(CoreMemoryError, match=r"core \(y=0, x=0\): buffer '_gemm_a_in' needs 64 B, budget 192 B, 192 B already in use"):
            gemm(wafer, np.ones((8, 8), np.float32), np.ones((8, 8), np.float32))


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_task_and_map_overheads_add_once_per_step_and_once_per_row_of_b(config):
    """Each compute-shift step's product is one task on every core and one @map per row of its B block
    (Kt = 16 / 4 rows on a 4 x 4 mesh): 4 steps add 4 task switches and 4 x 4 map set-ups, exactly.
    GEMM-T's root adds its reduced partial in a second task per step."""
    cycles = {}
    for t, m in ((0.0, 0.0), (40.0, 0.0), (0.0, 3.0)):
        dev = preset("wse2").replace(name="o", task_overhead=t, map_overhead=m)
        with Wafer((4, 4), device=dev, cost_only=True) as wafer:
            cycles[t, m] = gemm(wafer, TensorShape((16, 16)), TensorShape((16, 16)), **config)[1].cycles
    tasks = 2 if config.get("transpose_b") else 1
    assert cycles[40.0, 0.0] - cycles[0.0, 0.0] == pytest.approx(4 * tasks * 40.0)
    assert cycles[0.0, 3.0] - cycles[0.0, 0.0] == pytest.approx(4 * 4 * 3.0)
