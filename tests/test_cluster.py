"""cluster.yaml is a valid Ray cluster-launcher file for GPU training (no cloud is contacted)."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_file_passes_ray_schema_validation():
    config = prepare_config(yaml.safe_load(CLUSTER.read_text()))
    validate_config(config)  # raises on a schema violation
    assert config["head_node_type"] in config["available_node_types"]


def test_workers_are_gpu_nodes_that_install_the_project():
    config = yaml.safe_load(CLUSTER.read_text())
    workers = [n for name, n in config["available_node_types"].items()
               if name != config["head_node_type"]]
    assert workers and all(n["node_config"]["InstanceType"].startswith(("g", "p")) for n in workers)
    assert config["docker"]["image"].startswith("rayproject/ray:") and "gpu" in config["docker"]["image"]
    assert any("pip install" in c and "swav-ray" in c for c in config["setup_commands"])
    assert any("mlflow server" in c for c in config["head_setup_commands"])
