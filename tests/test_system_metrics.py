"""Tests for orchestration.system_metrics: which runs sample their nodes, and which process does
(MLflow's own monitor, into a run of a temporary sqlite store; a whole run: tests/test_train.py)."""

from __future__ import annotations

import pytest

from orchestration.preflight import load_experiment
from orchestration.system_metrics import node_monitor, wanted


@pytest.mark.parametrize("setting, use_gpu, expected", [
    ("null", False, False), ("null", True, True),  # null: GPU runs only
    ("true", False, True), ("false", True, False),
])
def test_system_metrics_follow_the_setting_and_by_default_gpu_runs(setting, use_gpu, expected):
    cfg = load_experiment(None, [f"tracking.system_metrics={setting}", f"scaling.use_gpu={use_gpu}"])
    assert wanted(cfg) is expected


@pytest.mark.slow  # MLflow and its monitor thread: about 7 s
def test_only_local_rank_zero_of_a_tracked_run_samples_its_node(tmp_path):
    import socket
    import time

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("system", str(tmp_path / "mlruns"))
                               ).info.run_id
    cfg = load_experiment(None, ["tracking.system_metrics=true",
                             "tracking.system_metrics_every_s=0.2"])
    tracking = {"run_id": run_id, "uri": uri}
    for args in ((cfg, None, 0), (cfg, tracking, 1)):  # untracked; another process of the node
        with node_monitor(*args):
            time.sleep(0.6)
    assert not client.get_run(run_id).data.metrics
    with pytest.raises(RuntimeError):  # the block fails: the samples so far are still logged
        with node_monitor(cfg, tracking, 0):
            time.sleep(1.0)
            raise RuntimeError("boom")
    node = socket.gethostname()
    logged = client.get_run(run_id).data.metrics
    assert f"system/{node}/cpu_utilization_percentage" in logged, logged
    assert all(k.startswith(f"system/{node}/") for k in logged)
