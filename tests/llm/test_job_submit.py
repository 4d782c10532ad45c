"""``ray job submit`` to a local head started with token authentication, then read the job's result."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.cluster

REPO = Path(__file__).parent.parent.parent


@pytest.fixture()
def head(tmp_path):
    """A Ray head (its own raylet, dashboard and job server) with token authentication on."""
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    ray = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray, "start", "--head", "--port=6391", "--dashboard-port=8291", "--num-cpus=2",
                    "--include-dashboard=true", "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=180)
    yield ray, env
    subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_job_submit_runs_decode_and_returns_its_report(head, tmp_path, smollm2, tokenizer):
    from llm.reference import ReferenceModel

    ray, env = head
    out = tmp_path / "job.json"
    job = subprocess.run(
        [ray, "job", "submit", "--address", "http://127.0.0.1:8291", "--working-dir", str(REPO), "--",
         sys.executable, "cluster_configs/decode_job.py", "--prompt", "The capital of France is", "--mesh", "96x96",
         "--max-new-tokens", "2", "--prefill", "token", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
    report = json.loads(out.read_text())
    cfg, w, _ = smollm2
    ref = ReferenceModel(cfg, w, 8)
    ids = tokenizer.encode("The capital of France is")
    for i, t in enumerate(ids):
        logits = ref.forward(t, i)
    first = int(np.argmax(logits))
    second = int(np.argmax(ref.forward(first, len(ids))))
    assert report["prompt_ids"] == ids
    assert report["output_ids"] == [first, second]
    assert report["emulation"]["mesh"] == [96, 96]
