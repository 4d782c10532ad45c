"""The wafer-llm command line, run in-process."""

import json
import subprocess
import sys
import time

import pytest

from llm.cli import main


def test_bench_gemv_writes_the_documented_json_keys(tmp_path, capsys):
    """A single bench run prints a table and writes one object with the issue's keys."""
    out = tmp_path / "gemv.json"
    assert main(["bench", "gemv", "--P", "8", "--M", "64", "--N", "64", "--algo", "meshgemv", "--dtype", "float32", "--json", str(out)]) == 0
    row = json.loads(out.read_text())
    for key in ("algo", "P", "predicted_cycles", "predicted_us", "compute_cycles", "comm_cycles", "relay_stages",
                "routes_per_core_max", "sram_peak_bytes_max", "host_wall_s"):
        assert key in row, key
    assert row["algo"] == "meshgemv" and row["P"] == 8 and row["max_abs_error"] < 1e-4
    assert "meshgemv" in capsys.readouterr().out


def test_bench_gemm_traces_each_compute_shift_step(tmp_path):
    """MeshGEMM on 8 x 8 cores: the alignment, then 8 compute-shift steps, one after another in the run's span."""
    out = tmp_path / "t.json"
    assert main(["bench", "gemm", "--P", "8", "--M", "64", "--K", "64", "--N", "64", "--algo", "meshgemm",
                 "--cost-only", "--trace", str(out), "--json", str(tmp_path / "g.json")]) == 0
    spans = [e for e in json.loads(out.read_text())["traceEvents"] if e["ph"] == "X" and e["pid"] == 1]
    run, parts = spans[0], spans[1:]
    assert run["name"] == "gemm meshgemm P=8" and [e["name"] for e in parts] == ["align"] + ["meshgemm step"] * 8
    assert sum(e["dur"] for e in parts) == pytest.approx(run["dur"], rel=1e-9)
    assert json.loads((tmp_path / "g.json").read_text())["predicted_cycles"] == run["args"]["cycles"]


def test_bench_gemm_sweep_writes_a_list_and_a_plot(tmp_path):
    """A sweep over P writes one row per (P, algo), records SUMMA's routing failure, and draws a PNG."""
    out, png = tmp_path / "gemm.json", tmp_path / "gemm.png"
    argv = ["bench", "gemm", "--sweep-P", "4,16", "--M", "64", "--K", "64", "--N", "64", "--algo", "meshgemm,cannon,summa",
            "--cost-only", "--json", str(out), "--plot", str(png)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())
    assert [(r["P"], r["algo"]) for r in rows] == [(p, a) for p in (4, 16) for a in ("meshgemm", "cannon", "summa")]
    assert "RoutingError" in rows[-1]["error"] and "error" not in rows[-2]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_unknown_algorithms(capsys):
    """An unknown algorithm name is refused with the valid choices."""
    assert main(["bench", "gemv", "--algo", "fastest"]) == 2
    assert "unknown gemv algo 'fastest'; choose from meshgemv, ktree, pipeline, ring, chain" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["validate", "--grids", "420,6x6"], ["bench", "gemm", "--sweep-P", "4,6x6"],
                                  ["scale", "--nodes-or-tiles", "1,6x6"]], ids=lambda a: a[0])
def test_a_list_that_is_not_integers_is_refused_by_its_flag(argv, capsys):
    """A malformed comma-separated list is named with its flag before any work runs."""
    assert main(argv) == 2
    assert f"{argv[-2]} takes comma-separated positive integers, got '6x6'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [
    (["--workload", "decode", "--model", "random:llama9"], "unknown model preset 'llama9'; presets: smollm2-135m, "),
    (["--workload", "decode", "--model", "random:llama3-8b", "--layers", "33"],
     "layers must be an integer in [1, 32] for llama3-8b, got 33"),
    (["--workload", "decode", "--layers", "2"], "layers cuts a random model (random:PRESET), not the checkpoint"),
    (["--workload", "gemv", "--model", "random:llama3-8b"], "the gemv workload takes neither"),
    (["--workload", "decode", "--model", "random:llama3-8b"],
     "no square region of the wse2 wafer holds llama3-8b with 32 layers; give a mesh side (--mesh-side)"),
], ids=["preset", "layers", "checkpoint", "workload", "region"])
def test_scale_refuses_a_model_it_cannot_build(argv, says, capsys):
    """A random model's preset and layers, one no region holds, and a model given to a workload that runs none, are
    refused by name."""
    assert main(["scale", "--nodes-or-tiles", "1", *argv]) == 2
    assert says in capsys.readouterr().err


def test_scale_refuses_a_random_model_larger_than_the_free_memory(monkeypatch, capsys):
    """A random model is drawn in the driver: one that would not fit its free memory is refused with both sizes
    before a byte is drawn (the machine's free memory given as half a GiB; SmolLM2's shape needs 0.7)."""
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": 2**29})())
    assert main(["scale", "--workload", "decode", "--model", "random:smollm2-135m", "--nodes-or-tiles", "1"]) == 2
    assert ("random:smollm2-135m with 30 layers needs 0.7 GiB to draw its weights; this machine has 0.5 GiB free: "
            "keep fewer layers (--layers)") in capsys.readouterr().err


def test_scale_refuses_a_mesh_side_that_does_not_hold_the_model(capsys):
    """A given mesh side is checked against the model before its weights are drawn, in scale's own flag."""
    argv = ["scale", "--workload", "decode", "--model", "random:smollm2-135m", "--layers", "2", "--mesh-side", "16",
            "--nodes-or-tiles", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "one layer of smollm2-135m needs" in err and "on a 16x16 region" in err and "Use a larger --mesh-side" in err


def test_demo_runs_in_process(capsys):
    """The demo checks its protocols against NumPy and reports predicted cycles."""
    assert main(["demo", "--mesh", "4x4", "--tiles", "2x2", "--transport", "local", "--block", "8"]) == 0
    assert "cycles" in capsys.readouterr().out


def test_an_internal_error_keeps_its_traceback(tmp_path):
    """An error that is not bad input (here a ProtocolError, which only a bug of ours raises) is not turned into a
    user message: the process exits 1 and prints the traceback."""
    code = ("import sys, llm.cli as cli\n"
            "from wafer_actors.errors import ProtocolError\n"
            "def broken(args):\n"
            "    raise ProtocolError('two sources for one core')\n"
            "cli.cmd_devices = broken\n"
            "sys.exit(cli.main(['devices']))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "Traceback" in run.stderr and "ProtocolError: two sources for one core" in run.stderr
    assert "wafer-llm: error" not in run.stderr


def test_an_unreachable_cluster_fails_at_once_in_one_line(capsys):
    """An address where nothing listens is refused within the connect deadline, naming the address (exit 2)."""
    t0 = time.perf_counter()
    assert main(["generate", "--prompt", "hi", "--address", "127.0.0.1:1"]) == 2
    assert time.perf_counter() - t0 < 30
    err = capsys.readouterr().err
    assert err.startswith("wafer-llm: error: no Ray cluster answers at 127.0.0.1:1") and "Traceback" not in err


def test_bench_exchange_parts_each_tiles_time_into_running_and_waiting():
    """One tile never waits; with the mesh on two tiles every x allreduce crosses the edge, so each tile waits."""
    from wafer_actors import InvalidArgument
    from wafer_actors.bench import bench_exchange

    one, two = (bench_exchange((4, 4), tiles, count=20) for tiles in ((1, 1), (1, 2)))
    assert one["wait_us"] == [0.0] and one["busy_us"][0] > 0
    assert len(two["wait_us"]) == 2 and min(two["wait_us"]) > 0
    for r in (one, two):  # a tile runs or waits for the whole run (and the driver adds its own part)
        assert max(b + w for b, w in zip(r["busy_us"], r["wait_us"])) <= r["us_per_allreduce"]
    with pytest.raises(InvalidArgument, match="count must be a positive integer"):
        bench_exchange((4, 4), (1, 1), count=0)
    # along y only, 1x2 tiles hold whole columns: no allreduce crosses the edge, so neither tile waits
    along_y = bench_exchange((4, 4), (1, 2), count=20, axes="y")
    assert along_y["wait_us"] == [0.0, 0.0]
    with pytest.raises(InvalidArgument, match="axes must be .* a string of x and y"):
        bench_exchange((4, 4), (1, 1), count=1, axes="z")
