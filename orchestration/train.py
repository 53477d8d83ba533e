"""Distributed SwAV training with Ray Train (V2) and MLflow tracking.

Driver (:func:`run_training`): creates or resumes the MLflow run, then fits a ``TorchTrainer``
whose workers run :func:`orchestration.worker.train_loop_per_worker` (DDP, one shard each, an
epoch report and a checkpoint per epoch).  When
a worker dies the driver fits again from the last checkpoint (``scaling.max_failures`` times, in
:func:`_fit`); errors that cannot succeed on a retry (``orchestration.failures``) stop the run at
once.  A new ``swav-ray train`` with the same ``scaling.run_name`` and ``storage_path`` resumes too;
``run.lock`` keeps a second process out meanwhile.  The final model goes to MLflow with the
PyTorch flavour.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig

from orchestration import run_storage, trial_stop
from orchestration.capacity import check_fits, connected_cluster
from orchestration.checkpoints import STATE_FILE, default_run_name, load_state, storage_root
from orchestration.config import ExperimentConfig, from_dict
from orchestration.crops_figure import start_crops_figure
from orchestration.datasets import dataset_inputs
from orchestration.failures import TrainingFailed, cause_of, storage_unreachable
from orchestration.pretrained import REPORT_TAG, starting_weights
from orchestration.progress import ConsoleProgress, ProgressBoard
from orchestration.ray_compat import NodeAddressTorchConfig, TorchTrainer
from orchestration.recipe import eval_image_size, initial_model
from orchestration.run_lock import Heartbeat, RunLock
from orchestration.tracking import TrackedRun
from orchestration.train_callbacks import EpochMetricsLogger
from orchestration.worker import FAIL_AT_EPOCH, train_loop_per_worker
from swav.data import SourceSplits

__all__ = ["TrainOutcome", "check_cluster_resources", "run_training"]

log = logging.getLogger(__name__)


# -- driver side ------------------------------------------------------------------------------

@dataclass
class TrainOutcome:
    run_id: str
    tracking_uri: str
    metrics: dict[str, Any]
    checkpoint_path: str | None
    run_name: str


def check_cluster_resources(cfg: ExperimentConfig) -> None:
    """Workers the connected cluster cannot place even at its largest (an autoscaler's declared
    maximum): a clear error instead of a hang; what it may add later is not refused."""
    check_fits(cfg, connected_cluster())


def run_training(
    cfg: ExperimentConfig,
    parent_run_id: str | None = None,
    callbacks: list | None = None,
    run_name: str | None = None,
    tracking_uri: str | None = None,
    tags: dict[str, str] | None = None,
    console: bool = False,
    splits: SourceSplits | None = None,
    export_model: bool = True,
) -> TrainOutcome:
    """Train ``cfg`` on the connected Ray cluster; returns the MLflow run id and final metrics.

    A Tune trial passes ``parent_run_id`` (nests the MLflow run), ``callbacks`` (Tune's
    ``TuneReportCallback``), ``tracking_uri`` (the sweep's server), ``tags`` and
    ``export_model=False`` (the sweep logs the best trial's model only). ``console``:
    draw a progress bar and a line per epoch (``swav-ray train``). ``splits``: the data as the
    driver's checks opened it (the crops figure is drawn from it).
    """
    check_cluster_resources(cfg)
    start = starting_weights(cfg)  # (read once: the driver's checks read it already)
    name = run_name or cfg.scaling.run_name or default_run_name("swav")
    root = storage_root(cfg)
    run_dir = f"{root}/{name}"
    with RunLock(run_dir) as lock:  # a second process with this run is refused, not mixed in
        tracked = TrackedRun.start(cfg, run_dir, name, parent_run_id, tags, tracking_uri)
        print(f"swav-ray: run {name} ({'resumed' if tracked.resumed else 'new'}), MLflow run "
              f"{tracked.run_id}, checkpoints under {run_dir}", flush=True)
        if not tracked.resumed:  # the data it trains and evaluates on (MLflow's Dataset column)
            tracked.client.log_inputs(tracked.run_id, datasets=dataset_inputs(cfg, splits))
        if start is not None:
            print(f"swav-ray: {start.report}", flush=True)
            tracked.client.set_tag(tracked.run_id, REPORT_TAG, start.report[:5000])
        figure = None if tracked.resumed else start_crops_figure(cfg, tracked, splits)
        board = ProgressBoard.remote() if console else None
        make_trainer = _trainer_factory(cfg, name, root, run_dir, tracked,
                                        [Heartbeat(lock), *(callbacks or [])], board,
                                        start.tensors if start is not None else None)
        if board is None:
            result = _fit_and_log(cfg, make_trainer, run_dir, tracked, figure, export_model)
        else:
            with ConsoleProgress(board, cfg.optim.epochs):
                result = _fit_and_log(cfg, make_trainer, run_dir, tracked, figure, export_model)
    metrics = dict(result.metrics or {})
    if cfg.eval.final_evaluation or cfg.eval.explain_images:
        # A Ray task, so that on a cluster it runs where a worker would (a GPU node).
        sc = cfg.scaling
        task = ray.remote(_after_training).options(
            num_cpus=sc.cpus_per_worker, num_gpus=1 if sc.use_gpu else 0)
        metrics.update(ray.get(task.remote(tracked.run_id, tracked.uri, cfg.to_dict())))
    return TrainOutcome(tracked.run_id, tracked.uri, metrics, checkpoint_uri(result, root), name)


def _fit_and_log(cfg: ExperimentConfig, make_trainer, run_dir: str, tracked: TrackedRun,
                 figure: threading.Thread | None = None,
                 export_model: bool = True) -> ray.train.Result:
    """Fit, log the final checkpoint (and, with ``export_model``, MLflow's model) and end the
    MLflow run: FINISHED, FAILED with the cause, or KILLED (interrupted: Ctrl-C). ``figure``:
    a thread still logging into the run, waited for before the run ends."""
    try:
        try:
            result = _fit(make_trainer, cfg.scaling.max_failures, run_dir)
        finally:
            if figure is not None:
                figure.join()
        if result.checkpoint is None:
            raise RuntimeError("training ended without a checkpoint")
        with result.checkpoint.as_directory() as directory:
            state_path = Path(directory) / STATE_FILE
            if cfg.tracking.log_model:
                tracked.log_artifact(state_path, "checkpoints")
                if export_model:
                    model = initial_model(cfg)
                    model.load_state_dict(load_state(state_path)["engine"]["model"])
                    tracked.log_model(model.eval(), eval_image_size(cfg))
                    if cfg.tracking.register_model:
                        registered = tracked.register_model(cfg.tracking.register_model)
                        tracked.client.set_tag(tracked.run_id, "registered_model", registered)
        tracked.client.set_tag(tracked.run_id, "ray_checkpoint", checkpoint_uri(result, run_dir))
    except BaseException as err:
        if isinstance(err, TrainingFailed):
            tracked.client.set_tag(tracked.run_id, "failure_cause", err.cause[:5000])
        killed = isinstance(err, (KeyboardInterrupt, trial_stop.TrialStopped))
        tracked.end_if_running("KILLED" if killed else "FAILED")
        raise
    tracked.end("FINISHED")
    return result


def _trainer_factory(cfg: ExperimentConfig, name: str, root: str, run_dir: str,
                     tracked: TrackedRun, callbacks: list, board=None, start=None):
    """A new TorchTrainer per attempt; the same name and storage make each resume the last.
    ``start``: the backbone's starting tensors (``model.init``), sent to every worker."""
    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker, **({"GPU": 1} if sc.use_gpu else {})}

    # Tests make a worker die once (SWAV_RAY_FAIL_AT_EPOCH, read here: a Ray instance started
    # earlier does not see this process's later environment).
    fail_at = os.environ.get(FAIL_AT_EPOCH)

    def make() -> ray.train.torch.TorchTrainer:
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": cfg.to_dict(), "run_dir": run_dir, "board": board,
                               "tracking": {"uri": tracked.uri, "run_id": tracked.run_id},
                               "fail_at_epoch": int(fail_at) if fail_at else None,
                               "init": start},
            scaling_config=ray.train.ScalingConfig(
                num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources),
            torch_config=NodeAddressTorchConfig(),
            run_config=RunConfig(
                name=name, storage_path=root,
                failure_config=FailureConfig(max_failures=0),  # retried by _fit
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                callbacks=[EpochMetricsLogger(tracked.uri, tracked.run_id), *callbacks],
            ),
        )

    return make


def _fit(make_trainer, max_failures: int, run_dir: str) -> ray.train.Result:
    """Fit, and after a worker failure that a retry may cure, or storage that stopped answering,
    fit again from the last checkpoint (at most ``max_failures`` times; first waiting for the
    storage to answer). Ray's own retries would also repeat errors that fail the same way every
    time (a config, a data schema, a full disk), at the cost of minutes."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return make_trainer().fit()
        except SystemExit as exc:  # Ray's Ctrl-C handler aborts the run, then exits
            raise KeyboardInterrupt from exc
        except ray.exceptions.RayActorError as err:  # the controller died: killed, if stopped
            if trial_stop.stopped(run_dir):
                raise trial_stop.TrialStopped(f"the sweep stopped trial {run_dir}") from err
            raise
        except ray.train.TrainingFailedError as err:
            cause, fatal = cause_of(err)
            unreachable = storage_unreachable(err)
            if unreachable is not None:
                cause = f"the run's storage {run_dir} did not answer: {unreachable}"
            retry = (fatal is None and attempt <= max_failures
                     and (isinstance(err, ray.train.WorkerGroupError) or unreachable is not None)
                     and run_storage.wait_until_it_answers(run_dir, unreachable or cause))
            if not retry:
                resumable = run_dir if run_storage.has_checkpoints(run_dir) else None
                raise TrainingFailed(cause, fatal, attempt, resumable) from err
            sys.stderr.write(f"swav-ray: attempt {attempt} failed ({cause}); resuming from the "
                             f"last checkpoint ({attempt} of {max_failures} retries)\n")


def checkpoint_uri(result: ray.train.Result, storage: str) -> str:
    """The result's checkpoint as the user named its storage: Ray gives a path within the file
    system (``bucket/runs/...`` for ``s3://bucket/runs``), here with the URI's scheme again."""
    path = result.checkpoint.path
    scheme, sep, _ = storage.partition("://")
    return f"{scheme}://{path.lstrip('/')}" if sep and "://" not in path else path


def _after_training(run_id: str, uri: str, cfg: dict[str, Any]) -> dict[str, float]:
    from orchestration.evaluate import after_training

    return after_training(run_id, uri, from_dict(cfg))

