"""The run's Ray Train callbacks: what the controller logs, and what a worker pays to receive
them (Ray Train sends the RunConfig, callbacks included, to every worker of every run)."""

from __future__ import annotations

import subprocess
import sys

from mlflow.tracking import MlflowClient

from orchestration.run_lock import Heartbeat, RunLock
from orchestration.train_callbacks import EpochMetricsLogger, ReportEpochsToTune, is_last_epoch


def test_an_epoch_report_is_logged_at_its_epoch_with_the_vocabulary_s_figures(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e", str(tmp_path / "mlruns"))).info.run_id
    logger = EpochMetricsLogger(uri, run_id)
    logger.after_report(None, [], None)  # a report without rank 0's metrics: nothing
    logger.after_report(None, [{"epoch": 2, "loss": 3.5, "knn_top1": None, "epochs_done": 3,
                                "images_per_s": 100}, {"epoch": 2, "loss": 9.0}], None)
    metrics = client.get_run(run_id).data.metrics
    assert metrics == {"loss": 3.5, "images_per_s": 100.0}  # rank 0's, the vocabulary only
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [2]


def test_a_worker_unpickling_the_callbacks_imports_neither_mlflow_nor_torch(tmp_path):
    """About a CPU-second of imports per worker process otherwise, on every run and trial."""
    from ray import cloudpickle

    blob = tmp_path / "callbacks.pkl"
    with RunLock(str(tmp_path / "run")) as lock:  # (Tune's callback is made in a trial only)
        blob.write_bytes(cloudpickle.dumps([EpochMetricsLogger("sqlite:///m.db", "r"),
                                            Heartbeat(lock), ReportEpochsToTune]))
    code = ("import pickle, sys; callbacks = pickle.loads(open(sys.argv[1], 'rb').read()); "
            "print([getattr(c, '__name__', type(c).__name__) for c in callbacks]); "
            "print([m for m in ('mlflow', 'torch', 'orchestration.tracking') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code, str(blob)], capture_output=True,
                         text=True, check=True, cwd=tmp_path).stdout.splitlines()
    assert out == ["['EpochMetricsLogger', 'Heartbeat', 'ReportEpochsToTune']", "[]"]


def test_the_run_s_last_epoch_is_optim_epochs_or_the_time_budget_s_plan():
    """Tune hears every epoch but the last, which the trial reports once its run has ended."""
    assert [is_last_epoch({"epochs_done": d}, 10) for d in (9, 10)] == [False, True]
    planned = [is_last_epoch({"epochs_done": d, "epochs_planned": 3}, 10) for d in (2, 3)]
    assert planned == [False, True]  # a budget planned 3 of at most 10 epochs
