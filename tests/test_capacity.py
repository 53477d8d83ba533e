"""Placing Ray Train workers on node groups: per-node fit, the cluster's largest size, shared
storage for runs that span nodes, and where the connected cluster's size is read from."""

from __future__ import annotations

import pytest

from orchestration.capacity import (
    Cluster,
    NodeGroup,
    check_fits,
    connected_cluster,
    from_launcher_config,
    placement,
    problems,
    totals,
)
from orchestration.config import ConfigError
from orchestration.preflight import experiment_from

G5 = NodeGroup("g5", 8, 1, 8)        # 8 vCPU, 1 GPU, at most 8 nodes
P4D = NodeGroup("p4d", 96, 8, 8)     # 8 GPUs per node
HEAD = NodeGroup("head", 0, 0, 1)


def cfg(workers: int, cpus: float, gpu: bool = True, storage: str = "./runs"):
    return experiment_from({"scaling": {"num_workers": workers, "cpus_per_worker": cpus,
                                     "use_gpu": gpu, "storage_path": storage}})


def test_workers_per_node_is_the_tighter_of_cpus_and_gpus():
    assert P4D.workers_per_node(12, 1) == 8 and P4D.workers_per_node(16, 1) == 6
    assert G5.workers_per_node(8, 1) == 1 and G5.workers_per_node(9, 1) == 0
    assert G5.workers_per_node(2, 0) == 4 and HEAD.workers_per_node(1, 0) == 0


def test_a_worker_larger_than_every_node_is_refused_naming_the_key():
    cluster = Cluster((HEAD, G5), "the cluster file's largest size")
    found = problems(cfg(64, 12), cluster)
    assert found == ["scaling.cpus_per_worker: a worker needs 12 CPU + 1 GPU on one node; no node "
                     "of the cluster file's largest size has that (head 0 CPU/0 GPU, g5 8 CPU/1 GPU)"]
    no_gpu = Cluster((NodeGroup("cpu", 8, 0, 4),), "the Ray cluster")
    assert problems(cfg(1, 4), no_gpu)[0].startswith("scaling.use_gpu: a worker needs 4 CPU + 1 GPU")


def test_capacity_counts_whole_workers_per_node_not_summed_cpus():
    cluster = Cluster((G5,), "c")
    # 8 nodes x 8 CPUs = 64 CPUs, but 6-CPU workers fit once per node: 8 workers, not 10.
    assert placement(cfg(10, 6), cluster) == (8, 8)
    assert problems(cfg(10, 6, storage="s3://b/runs"), cluster) == [
        "scaling.num_workers: 10 workers of 6 CPU + 1 GPU each; c places at most 8"]
    assert problems(cfg(8, 6, storage="s3://b/runs"), cluster) == []


def test_runs_spanning_nodes_need_shared_storage():
    cluster = Cluster((HEAD, G5, P4D), "c")
    assert placement(cfg(8, 12), cluster) == (64, 1)        # one p4d node holds all 8
    assert problems(cfg(8, 12), cluster) == []               # local ./runs is fine on one node
    assert placement(cfg(16, 12), cluster) == (64, 2)
    assert problems(cfg(16, 12), cluster) == [
        "scaling.storage_path: 16 workers span 2 nodes, so checkpoints need storage every node "
        "sees (s3://...), not './runs'"]
    assert problems(cfg(16, 12, storage="s3://bucket/runs"), cluster) == []
    with pytest.raises(ConfigError, match="^scaling.storage_path"):
        check_fits(cfg(16, 12), cluster)


def test_launcher_file_groups_use_declared_resources_or_the_instance_table():
    launcher = {
        "max_workers": 10, "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 0}, "node_config": {"InstanceType": "m6i.2xlarge"}},
            "gpu": {"max_workers": 12, "resources": {}, "node_config": {"InstanceType": "g5.2xlarge"}},
            "custom": {"max_workers": 2, "resources": {"CPU": 32, "GPU": 2},
                       "node_config": {"InstanceType": "x9.weird"}},
        }}
    cluster = from_launcher_config(launcher)
    assert cluster.groups == (NodeGroup("head", 0, 0, 1), NodeGroup("gpu", 8, 1, 10),
                              NodeGroup("custom", 32, 2, 2))
    assert totals(cluster) == {"CPU": 8 * 10 + 64, "GPU": 10 + 4}
    launcher["available_node_types"]["custom"]["resources"] = {}
    with pytest.raises(ConfigError, match="^custom: instance type 'x9.weird' unknown"):
        from_launcher_config(launcher)


def test_on_a_launcher_head_the_declared_maximum_is_read_from_its_bootstrap_file(
        tmp_path, monkeypatch):
    # No Ray connection and no autoscaler state in a GCS: the head's launcher file decides, so a
    # run that needs nodes the autoscaler has not started yet is not refused.
    (tmp_path / "ray_bootstrap_config.yaml").write_text(
        "max_workers: 4\nhead_node_type: head\navailable_node_types:\n"
        "  head: {resources: {CPU: 0}, node_config: {InstanceType: m6i.2xlarge}}\n"
        "  gpu: {max_workers: 4, resources: {}, node_config: {InstanceType: g5.2xlarge}}\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    cluster = connected_cluster()
    assert cluster.source == "the cluster's declared maximum (launcher file)"
    assert totals(cluster) == {"CPU": 32, "GPU": 4}
    check_fits(cfg(4, 8, storage="s3://b/runs"), cluster)
    with pytest.raises(ConfigError, match="^scaling.num_workers: 5 workers of 8 CPU \\+ 1 GPU "
                                          "each; the cluster's declared maximum"):
        check_fits(cfg(5, 8, storage="s3://b/runs"), cluster)
