"""Does an experiment fit a cluster?  One check for the running cluster, the cluster-launcher file
and the tests that hold the shipped experiments against ``cluster.yaml``.

A cluster is a list of node groups (CPUs and GPUs per node, the most nodes of the group).  A Ray
Train worker holds ``cpus_per_worker`` CPUs and, with ``use_gpu``, one GPU, all on one node, so
the question is how many workers the groups can place, not the cluster's summed resources
(12 CPUs per worker on 8-vCPU nodes never fit, however many nodes there are).  An autoscaling
cluster is judged by its declared maximum (what the autoscaler may add), a fixed one by what it
has now.  Runs spread over several nodes need storage that every node sees (``s3://``, ``gs://``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestration.config import ConfigError, ExperimentConfig

# vCPUs and GPUs of the instance types our cluster files use (the launcher reads them from AWS;
# a type not listed here must declare its `resources` in the file).
INSTANCE_TYPES: dict[str, tuple[int, int]] = {
    "m6i.xlarge": (4, 0), "m6i.2xlarge": (8, 0), "m6i.4xlarge": (16, 0),
    "g5.xlarge": (4, 1), "g5.2xlarge": (8, 1), "g5.4xlarge": (16, 1), "g5.8xlarge": (32, 1),
    "g5.12xlarge": (48, 4), "g5.24xlarge": (96, 4), "g5.48xlarge": (192, 8),
    "g6.2xlarge": (8, 1), "g6e.2xlarge": (8, 1),
    "p4d.24xlarge": (96, 8), "p4de.24xlarge": (96, 8), "p5.48xlarge": (192, 8),
}
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # on the head of a launcher-started cluster
SHARED_SCHEMES = ("s3://", "gs://", "abfs://", "hdfs://")


@dataclass(frozen=True)
class NodeGroup:
    name: str
    cpus: float
    gpus: float
    max_nodes: int

    def workers_per_node(self, cpus: float, gpus: float) -> int:
        fit = math.floor(self.cpus / cpus) if cpus > 0 else math.inf
        if gpus > 0:
            fit = min(fit, math.floor(self.gpus / gpus))
        return 0 if fit == math.inf else int(fit)


@dataclass(frozen=True)
class Cluster:
    groups: tuple[NodeGroup, ...]
    source: str  # how the reader's message names it, e.g. "the cluster's declared maximum"


def totals(cluster: Cluster) -> dict[str, float]:
    """CPUs and GPUs of the cluster at its largest."""
    return {"CPU": sum(g.cpus * g.max_nodes for g in cluster.groups),
            "GPU": sum(g.gpus * g.max_nodes for g in cluster.groups)}


def placement(cfg: ExperimentConfig, cluster: Cluster) -> tuple[int, int]:
    """(workers the cluster can place, nodes the experiment's workers spread over at least)."""
    sc = cfg.scaling
    gpus = 1.0 if sc.use_gpu else 0.0
    per_node = sorted((g.workers_per_node(sc.cpus_per_worker, gpus), g.max_nodes)
                      for g in cluster.groups)
    capacity = sum(w * n for w, n in per_node)
    left, nodes = sc.num_workers, 0
    for workers, count in reversed(per_node):  # the fullest nodes first
        while left > 0 and count > 0 and workers > 0:
            left, count, nodes = left - workers, count - 1, nodes + 1
    return capacity, nodes


def problems(cfg: ExperimentConfig, cluster: Cluster) -> list[str]:
    """Why ``cfg`` cannot run on ``cluster``: one line per problem, each naming the key."""
    sc = cfg.scaling
    gpus = 1 if sc.use_gpu else 0
    worker = f"{sc.cpus_per_worker:g} CPU" + (" + 1 GPU" if gpus else "")
    if not any(g.workers_per_node(sc.cpus_per_worker, gpus) for g in cluster.groups):
        sizes = ", ".join(f"{g.name} {g.cpus:g} CPU/{g.gpus:g} GPU" for g in cluster.groups)
        key = "scaling.cpus_per_worker" if any(g.gpus >= gpus for g in cluster.groups) \
            else "scaling.use_gpu"
        return [f"{key}: a worker needs {worker} on one node; no node of {cluster.source} "
                f"has that ({sizes})"]
    capacity, nodes = placement(cfg, cluster)
    out = []
    if sc.num_workers > capacity:
        out.append(f"scaling.num_workers: {sc.num_workers} workers of {worker} each; "
                   f"{cluster.source} places at most {capacity}")
    if nodes > 1 and not sc.storage_path.startswith(SHARED_SCHEMES):
        out.append(f"scaling.storage_path: {sc.num_workers} workers span {nodes} nodes, so "
                   f"checkpoints need storage every node sees (s3://...), not "
                   f"{sc.storage_path!r}")
    return out


def from_launcher_config(config: dict[str, Any]) -> Cluster:
    """The worker node groups of a Ray cluster-launcher file (the head too if it has CPUs)."""
    groups, total_cap = [], config.get("max_workers")
    head = config.get("head_node_type")
    for name, node in config.get("available_node_types", {}).items():
        declared = node.get("resources") or {}
        kind = (node.get("node_config") or {}).get("InstanceType")
        if "CPU" in declared and "GPU" in declared:
            cpus, gpus = declared["CPU"], declared["GPU"]
        elif kind in INSTANCE_TYPES:
            cpus, gpus = INSTANCE_TYPES[kind]
            cpus, gpus = declared.get("CPU", cpus), declared.get("GPU", gpus)
        else:
            raise ConfigError(f"{name}: instance type {kind!r} unknown; declare its resources "
                              f"(CPU, GPU) in the cluster file")
        count = 1 if name == head else int(node.get("max_workers", total_cap or 0))
        if total_cap is not None and name != head:
            count = min(count, int(total_cap))
        groups.append(NodeGroup(name, float(cpus), float(gpus), count))
    return Cluster(tuple(groups), "the cluster file's largest size")


def _from_gcs() -> Cluster | None:
    """The autoscaler's node groups as it published them to the GCS (None: not autoscaling)."""
    from orchestration.ray_compat import autoscaler_node_groups

    declared = autoscaler_node_groups()
    if declared is None:
        return None
    groups = [NodeGroup(name, cpus, gpus, most if most >= 0 else 10**6)
              for name, cpus, gpus, most in declared]
    return Cluster(tuple(groups), "the cluster's declared maximum (autoscaler)")


def _from_nodes() -> Cluster:
    """A fixed cluster: the nodes alive now."""
    import ray

    groups = [NodeGroup(n["NodeManagerAddress"], n["Resources"].get("CPU", 0.0),
                        n["Resources"].get("GPU", 0.0), 1)
              for n in ray.nodes() if n.get("Alive")]
    return Cluster(tuple(groups), "the Ray cluster")


def connected_cluster() -> Cluster:
    """The connected cluster as far as it can grow: the autoscaler's declared groups, else the
    launcher file on this head node, else the nodes alive now."""
    cluster = _from_gcs()
    if cluster is None and Path(BOOTSTRAP_CONFIG).expanduser().exists():
        import yaml

        launcher = yaml.safe_load(Path(BOOTSTRAP_CONFIG).expanduser().read_text())
        try:
            cluster = from_launcher_config(launcher)
        except ConfigError:
            cluster = None
        if cluster is not None:
            cluster = Cluster(cluster.groups, "the cluster's declared maximum (launcher file)")
    return cluster if cluster is not None else _from_nodes()


def check_fits(cfg: ExperimentConfig, cluster: Cluster) -> None:
    """The first problem as a ConfigError (exit 2 in the CLI)."""
    found = problems(cfg, cluster)
    if found:
        raise ConfigError(found[0])
