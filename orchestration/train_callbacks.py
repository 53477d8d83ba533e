"""The Ray Train callbacks of a run: per-epoch MLflow metrics, and Tune's reports in a sweep.

Ray Train sends the run's ``RunConfig``, callbacks included, to the controller and to every worker,
so each worker imports the module of each callback; that happens for every run and every Tune
trial.  Hence a module of its own that imports only Ray: MLflow is imported when the controller
first logs (see :class:`orchestration.run_lock.Heartbeat`, the lock's, likewise light).
"""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback
from ray.tune.integration.ray_train import TuneReportCallback

from orchestration.metrics import loggable

__all__ = ["NODES_TAG", "RETRAINED_TAG", "EpochMetricsLogger", "ReportEpochsToTune", "is_last_epoch"]

RETRAINED_TAG = "retrained_epochs"  # epochs logged twice: their first checkpoint did not load
NODES_TAG = "ray_nodes"  # the Ray nodes the workers ran on, each attempt's added


class EpochMetricsLogger(UserCallback):
    """Logs rank 0's report of each epoch into the run (in the Train controller, after the
    epoch's checkpoint is persisted: an epoch re-run after a failure was never reported, so every
    epoch is logged once). The exception: an epoch whose checkpoint was unreadable on a resume
    is trained and logged again, and tag ``retrained_epochs`` lists it. Tag ``ray_nodes`` lists
    the Ray nodes each attempt's workers ran on (a node lost mid-run shows as one more)."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self._run = None  # the MLflow client, made at the first report in the controller

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_run": None}  # (sent to the controller without a client)

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not metrics:
            return
        if self._run is None:
            from orchestration.tracking import TrackedRun

            self._run = TrackedRun(self.uri, self.run_id)
        report, run = metrics[0], self._run
        run.log_metrics(loggable(report), step=int(report["epoch"]))
        for node in str(report.get("nodes") or "").split(","):
            if node:
                run.add_to_tag(NODES_TAG, node)
        if report.get("retrained"):
            run.add_to_tag(RETRAINED_TAG, str(int(report["epoch"])))


class ReportEpochsToTune(TuneReportCallback):
    """Tune's Train callback, holding back the last epoch: the trial reports it itself once its
    run has ended (model logged, run FINISHED), so that a scheduler's stop on the last epoch
    never cuts the run's end short."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics and is_last_epoch(metrics[0], self.epochs):
            return
        super().after_report(run_context, metrics, checkpoint)


def is_last_epoch(report: dict, epochs: int) -> bool:
    """Whether ``report`` is the run's last epoch: ``epochs`` (``optim.epochs``), or the epochs a
    time budget planned (each report carries the plan as ``epochs_planned``)."""
    return report.get("epochs_done", 0) >= report.get("epochs_planned", epochs)
