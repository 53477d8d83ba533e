"""cluster.yaml is a valid Ray cluster-launcher file for GPU training that every shipped GPU
experiment fits, with token auth on every node (no cloud is contacted)."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from orchestration.capacity import Cluster, from_launcher_config, placement, problems
from orchestration.config import EXPERIMENTS_DIR, ExperimentConfig, load_config

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


def _gpu_experiments(monkeypatch) -> dict[str, ExperimentConfig]:
    # As submitted to the cluster: data paths live on the workers, not on this machine.
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    configs = {p.stem: load_config(p.stem) for p in sorted(EXPERIMENTS_DIR.glob("*.yaml"))
               if not p.stem.startswith("sweep_")}
    return {name: cfg for name, cfg in configs.items() if cfg.scaling.use_gpu}


def test_every_gpu_experiment_fits_the_cluster_file(monkeypatch):
    cluster = from_launcher_config(yaml.safe_load(CLUSTER.read_text()))
    experiments = _gpu_experiments(monkeypatch)
    assert {"cifar10_resnet18", "cifar10_wallclock", "imagenet_resnet50",
            "stanford_dogs_resnet50"} <= set(experiments)
    for name, cfg in experiments.items():
        assert problems(cfg, cluster) == [], name
        capacity, nodes = placement(cfg, cluster)
        assert capacity >= cfg.scaling.num_workers
        if nodes > 1:  # checkpoints where every node sees them
            assert cfg.scaling.storage_path.startswith("s3://"), name
    paper = experiments["imagenet_resnet50"]
    assert placement(paper, cluster) == (64, 8)  # 8 p4d nodes of 8 GPUs
    # The check has teeth: the old file (g5 nodes only, 8 of them) refused the paper's recipe.
    g5_only = Cluster(tuple(g for g in cluster.groups if g.name != "gpu_8x"), "old")
    assert problems(paper, g5_only)[0].startswith("scaling.cpus_per_worker: a worker needs 12 CPU")


def test_every_node_starts_ray_with_token_auth_and_gets_the_token():
    config = yaml.safe_load(CLUSTER.read_text())
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    # Nothing is opened to the outside beyond the launcher's default (SSH).
    assert "security_group" not in config["provider"]
