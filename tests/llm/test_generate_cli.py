"""``wafer-llm generate`` end to end, and its refusals: each a one-line message, exit code 2."""

from __future__ import annotations

import json

import pytest

from llm.cli import main
from tests.helpers import reference_greedy


def test_generate_writes_json_report(tmp_path, capsys, smollm2, tokenizer):
    cfg, w, _ = smollm2
    ids = tokenizer.encode("The capital of France is")
    expected = reference_greedy(cfg, w, ids, 3)
    out = tmp_path / "g.json"
    code = main(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "3", "--mesh", "64x64",
                 "--transport", "local", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["prompt_ids"] == ids
    assert report["output_ids"] == expected
    assert report["text"] == tokenizer.decode(expected)
    pred = report["predicted"]
    assert pred["device"] == "wse2" and pred["cycles_per_step"] > 0 and pred["prefill"] == "mesh"  # the default
    assert pred["ttft_s"] > 0 and pred["handover_s"] > 0 and pred["decode_tokens_per_s"] > 0
    assert pred["e2e_tokens_per_s"] < pred["decode_tokens_per_s"]  # the prompt's time counts end to end
    assert report["emulation"]["mesh"] == [64, 64] and report["emulation"]["tiles"] == [1, 1]
    for phase in ("prefill", "decode"):  # one 64x64 region of the wafer: most of it idle
        util = pred["utilisation"][phase]
        assert 0 < util["mbu"] < util["mbu_cores_used"] < 1 and 0 < util["mfu"] < util["mfu_cores_used"] < 1
    captured = capsys.readouterr()
    assert "The capital of France is Paris." in captured.out
    assert "tokens/s" in captured.err and "decode MBU" in captured.err


@pytest.mark.parametrize(
    "args, message",
    [  # refused before the model loads
        (["--model", "nope"], "unknown model 'nope'"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--top-k", "-2"], "top_k must be >= 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--mesh", "1000x1000"], "1000"),
        (["--mesh", "8"], "ROWSxCOLS"),
        (["--snapshot-every", "-1"], "--snapshot-every must be a number of steps >= 0"),
        (["--drain-node", "abc"], "--drain-node takes NODE:N"),
        (["--drain-node", "abc:2"], "--drain-node moves Ray tiles between nodes: it needs --transport ray"),
        # refused once the model's size is known, before any token runs
        (["--mesh", "16x16"], "Use a larger --mesh"),
        (["--mesh", "64x64", "--max-new-tokens", "9000"], "context is 8192: ask for at most"),
        (["--max-new-tokens", "100000"], "context is 8192: ask for at most"),  # the cause, not the mesh
        (["--model", "missing/model.gguf"], "no such file or directory: missing/model.gguf"),
    ],
)
def test_generate_refusals(args, message, capsys):
    code = main(["generate", "--prompt", "Hi", "--transport", "local", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_ctrl_c_stops_at_once_and_leaves_no_process_behind():
    """SIGINT mid-decode on a Ray tile: exit 130 within seconds, the text so far printed, every process of the run gone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    prompt = "Once upon a time"
    # SIGINT as a terminal delivers it, also where the tests run in the background (which starts them with it ignored)
    cli = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
           "runpy.run_module('llm.cli', run_name='__main__')")
    p = subprocess.Popen([sys.executable, "-c", cli, "generate", "--prompt", prompt, "--max-new-tokens", "40",
                          "--mesh", "96x96", "--tiles", "1x1", "--prefill", "token"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.set_blocking(p.stdout.fileno(), False)
    shown, deadline = b"", time.monotonic() + 240
    while len(shown) <= len(prompt) + 3:  # decode has begun once new text follows the prompt
        assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()
        shown += p.stdout.read() or b""
        time.sleep(0.1)
    run = psutil.Process(p.pid).children(recursive=True)  # the Ray instance and tile workers of this run
    assert len(run) >= 2
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and time.monotonic() - t0 < 10
    assert shown.decode().startswith(prompt)
    assert "interrupted after" in err.decode() and "Traceback" not in err.decode()
    deadline = time.monotonic() + 10
    while any(q.is_running() and q.status() != psutil.STATUS_ZOMBIE for q in run) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [q.pid for q in run if q.is_running() and q.status() != psutil.STATUS_ZOMBIE]
