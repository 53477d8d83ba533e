"""MLflow system metrics from every node of a run: CPU, memory, disk and network through psutil,
GPU utilisation and memory through NVML, logged by one thread per node into the run as
``system/<node>/<metric>`` (MLflow's names, so the UI's System metrics tab shows them)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def wanted(cfg: Any) -> bool:
    """``tracking.system_metrics``: true, false, or null for GPU runs only."""
    on = cfg.tracking.system_metrics
    return bool(cfg.scaling.use_gpu) if on is None else bool(on)


@contextmanager
def node_monitor(cfg: Any, tracking: dict[str, str] | None, local_rank: int) -> Iterator[None]:
    """Sample this node while the block runs (local rank 0 of each node; others do nothing).
    ``tracking``: the run's ``uri`` and ``run_id``; a resumed run continues its steps."""
    if tracking is None or local_rank != 0 or not wanted(cfg):
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        tracking["run_id"], sampling_interval=cfg.tracking.system_metrics_every_s,
        samples_before_logging=1, resume_logging=True, node_id=socket.gethostname(),
        tracking_uri=tracking["uri"])
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
