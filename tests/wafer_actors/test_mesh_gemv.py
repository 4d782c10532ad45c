import numpy as np
import pytest

from wafer_actors import ProtocolError, Spec, Wafer, preset
from wafer_actors.collectives import mesh_gemv
from wafer_actors.ops import TensorShape, gemv

DEV = preset("wse2")


def data(m, n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(m).astype(np.float32), rng.standard_normal((m, n)).astype(np.float32)


@pytest.mark.parametrize("algo", ["ktree", "pipeline", "ring"])
@pytest.mark.parametrize("mesh, m, n, axis", [((6, 6), 48, 36, "y"), ((5, 8), 37, 53, "y"), ((5, 8), 37, 53, "x"), ((1, 9), 20, 7, "x")])
def test_mesh_gemv_equals_numpy(algo, mesh, m, n, axis):
    """x . W on the wafer equals NumPy for square and non-square meshes and sizes that do not divide them."""
    x, w = data(m, n)
    with Wafer(mesh, tiles=(1, 2)) as wafer:
        y, _ = gemv(wafer, x, w, axis=axis, algo=algo)
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5, err_msg=f"{algo} emulator (actual) vs NumPy (desired)")


@pytest.mark.parametrize("transport", ["local", "ray"])
def test_mesh_gemv_is_invariant_to_tiling_and_transport(request, transport):
    """Results and clocks are bit-identical for 1, 4 and 9 tiles and across transports."""
    if transport == "ray":
        request.getfixturevalue("ray_local")
    x, w = data(60, 45, seed=1)
    runs = []
    for tiles in [(1, 1), (2, 2), (3, 3)]:
        with Wafer((6, 9), tiles=tiles, transport=transport if tiles != (1, 1) else "local") as wafer:
            y, s = gemv(wafer, x, w, algo="ktree")
            runs.append((y, s.cycles, wafer.clocks()))
    for y, cycles, clocks in runs[1:]:
        np.testing.assert_array_equal(y, runs[0][0])
        np.testing.assert_array_equal(clocks, runs[0][2])
        assert cycles == runs[0][1]


@pytest.mark.parametrize("algo", ["ktree", "pipeline", "ring"])
def test_cost_only_predicts_the_full_run_cycles(algo):
    """Shapes alone give the same cycles, relay stages and compute as the full GEMV."""
    x, w = data(64, 48, seed=2)
    with Wafer((8, 8), tiles=(2, 2)) as full, Wafer((8, 8), tiles=(2, 2), cost_only=True) as shapes:
        _, a = gemv(full, x, w, algo=algo)
        y, b = gemv(shapes, TensorShape((64,)), TensorShape((64, 48)), algo=algo)
    assert y is None
    assert (a.cycles, a.relay_stages, a.compute_cycles) == (b.cycles, b.relay_stages, b.compute_cycles)


def test_ktree_beats_the_pipeline_and_the_gap_grows_with_p():
    """MeshGEMV's critical path holds about sqrt(P) relays against the pipeline's P - 1."""
    ratios = []
    for p in (36, 100):
        with Wafer((p, p), cost_only=True) as wafer:
            shape = (TensorShape((2048,), "float16"), TensorShape((2048, 2048), "float16"))
            _, tree = gemv(wafer, *shape, algo="ktree")
            _, pipe = gemv(wafer, *shape, algo="pipeline")
        assert pipe.relay_stages == p - 1 and tree.relay_stages <= np.sqrt(p) + 2
        ratios.append(pipe.cycles / tree.cycles)
    assert ratios[0] > 1 and ratios[1] > ratios[0]


def test_mismatched_blocks_are_a_clear_error():
    """Buffers whose blocks do not chain are refused, naming the shapes found and expected."""
    with Wafer((2, 2)) as wafer:
        wafer.load("x", np.ones(4, np.float32), Spec("y"))
        wafer.load("w", np.ones((6, 4), np.float32), Spec("y", "x"))
        wafer.alloc("y", (4,), np.float32, Spec("x"))
        with pytest.raises(ProtocolError, match=r"x \(2,\), W \(3, 2\), out \(2,\); expected x \(Mt,\), W \(Mt, Nt\)"):
            wafer.run(mesh_gemv, x="x", w="w", out="y")
        with pytest.raises(ValueError, match=r"x has 3 elements but w has 4 rows"):
            gemv(wafer, np.ones(3, np.float32), np.ones((4, 2), np.float32))
