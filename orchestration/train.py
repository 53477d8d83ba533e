"""Distributed SwAV training with Ray Train (V2) and MLflow tracking.

Driver (:func:`run_training`): creates or resumes the MLflow run, then fits a ``TorchTrainer``
whose workers run :func:`train_loop_per_worker`: DDP over gloo (CPU) or NCCL (GPU), each worker on
its own contiguous shard, Sinkhorn codes gathered across workers.  Every epoch each worker calls
``ray.train.report``; rank 0 attaches a checkpoint (engine state: model, optimiser, schedule,
queue, iteration; the epoch; every rank's RNG state), written to a temporary file and renamed.  When
a worker dies the driver fits again from the last checkpoint (``scaling.max_failures`` times, in
:func:`_fit`); errors that cannot succeed on a retry (``orchestration.failures``) stop the run at
once.  A new ``swav-ray train`` with the same ``scaling.run_name`` and ``storage_path`` resumes too;
``run.lock`` keeps a second process out meanwhile.  The final model goes to MLflow with the
PyTorch flavour.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, RunConfig

from orchestration.capacity import check_fits, connected_cluster
from orchestration.checkpoints import (
    STATE_FILE,
    CheckpointError,
    load_state,
    rng_state,
    save_state,
    set_rng_state,
)
from orchestration.config import ExperimentConfig, from_dict
from orchestration.failures import TrainingFailed, as_not_retryable, cause_of
from orchestration.metrics import epoch_report
from orchestration.progress import ConsoleProgress, ProgressBoard, StepPoster
from orchestration.recipe import Training, build_training, check_data_here, initial_model
from orchestration.run_lock import Heartbeat, RunLock
from orchestration.system_metrics import node_monitor
from orchestration.tracking import EpochMetricsLogger, TrackedRun
from swav.engine import SwAVEngine
from swav.evaluation import extract_features, knn_predict
from swav.model import SwAVModel

__all__ = ["TrainOutcome", "check_cluster_resources", "default_run_name", "run_training",
           "train_loop_per_worker"]

log = logging.getLogger(__name__)
FAILURE_MARKER = "injected_failure"


# -- worker side ------------------------------------------------------------------------------

def _gather_cat(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.to(device)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts).cpu()


def distributed_knn(model: SwAVModel, evaluation, cfg: ExperimentConfig,
                    device: torch.device) -> float | None:
    """kNN top-1 on the held-out split: each worker embeds its own shards, the training-shard
    features are all-gathered into one bank, and the correct counts are summed."""
    bank_loader, query_loader, n_classes = evaluation
    bank, bank_labels = extract_features(model.backbone, bank_loader, device)
    queries, query_labels = extract_features(model.backbone, query_loader, device)
    if bank_labels is None or query_labels is None:
        return None
    bank, bank_labels = _gather_cat(bank, device), _gather_cat(bank_labels, device)
    scores = knn_predict(bank, bank_labels, queries, n_classes, cfg.eval.knn_k,
                         cfg.eval.knn_temperature)
    counts = torch.tensor([(scores.argmax(1) == query_labels).sum().item(), len(query_labels)],
                          dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        counts = counts.to(device)
        dist.all_reduce(counts)
    return float(counts[0] / counts[1])


def _all_rng_states() -> list[dict[str, Any]]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        states: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(states, rng_state())
        return states
    return [rng_state()]


def _maybe_fail(cfg: ExperimentConfig, epoch: int, rank: int, run_dir: str | None) -> None:
    """Test-only: rank 1 (or 0 alone) dies hard once at ``fail_at_epoch``."""
    if cfg.fail_at_epoch != epoch or run_dir is None or "://" in run_dir:
        return
    marker = Path(run_dir) / FAILURE_MARKER
    if rank == min(1, cfg.scaling.num_workers - 1) and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"rank {rank} killed at epoch {epoch}\n")
        os._exit(17)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker; an error no retry can cure leaves as ``NotRetryable``."""
    try:
        _train_worker(config)
    except Exception as err:
        fatal = as_not_retryable(err)
        if fatal is None:
            raise
        raise fatal from err


def _train_worker(config: dict[str, Any]) -> None:
    cfg = from_dict(config["cfg"])
    local_rank = ray.train.get_context().get_local_rank()
    with node_monitor(cfg, config.get("tracking"), local_rank):  # system metrics, per node
        _train_epochs(cfg, config)


def _train_epochs(cfg: ExperimentConfig, config: dict[str, Any]) -> None:
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    check_data_here(cfg)
    training = build_training(cfg, rank, world, device, wrap=ray.train.torch.prepare_model)
    engine = training.engine
    start_epoch = _restore(engine, rank)
    board = config.get("board")  # the driver's console (swav-ray train), else None
    # The same encoder before training: the baseline every kNN figure is compared with.
    init_knn = None
    if start_epoch == 0 and training.evaluation is not None:
        init_knn = distributed_knn(engine.net, training.evaluation, cfg, device)
    images_seen = corrupt_seen = 0
    for epoch in range(start_epoch, cfg.optim.epochs):
        _maybe_fail(cfg, epoch, rank, config.get("run_dir"))
        poster = None
        if board is not None and rank == 0:
            poster = StepPoster(board, epoch, training.steps_per_epoch, engine.iteration,
                                cfg.optim.batch_size)
        stats = training.run_epoch(epoch, on_step=poster)
        images_seen += stats.images
        corrupt_seen += stats.corrupt_images
        if corrupt_seen > cfg.data.max_corrupt_fraction * images_seen:
            raise ValueError(
                f"data: {corrupt_seen} of {images_seen} images failed to decode, more than "
                f"data.max_corrupt_fraction={cfg.data.max_corrupt_fraction}")
        report = epoch_report(stats, _epoch_knn(training, epoch, device),
                              init_knn if epoch == 0 else None)
        rng = _all_rng_states()
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_state(Path(tmp), {"engine": engine.state_dict(), "epoch": epoch, "rng": rng,
                                       "config": config["cfg"]})
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            # Named by epoch: the previous checkpoint (a fallback) is the next name down.
            ray.train.report(report, checkpoint=ckpt,
                             checkpoint_dir_name=f"checkpoint_epoch{epoch:06d}")
        if poster is not None:
            board.post_epoch.remote(report)


def _restore(engine: SwAVEngine, rank: int) -> int:
    """Load the newest readable checkpoint into the engine; the first epoch still to run."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    if rank == 0:
        for path in _unregistered(checkpoint):
            checkpoint.filesystem.delete_dir(path)
            log.warning("removed %s: written but never registered by Ray", path)
    errors: list[str] = []
    for candidate in _newest_first(checkpoint):
        with candidate.as_directory() as directory:
            try:
                state = load_state(Path(directory) / STATE_FILE)
            except CheckpointError as err:
                errors.append(str(err))
                continue
        # The schedule's length is the config's: a resume may extend optim.epochs, and the
        # cosine then stretches from the current iteration to the new end.
        total, warmup = engine.scheduler.total_steps, engine.scheduler.warmup_steps
        engine.load_state_dict(state["engine"])
        engine.scheduler.total_steps, engine.scheduler.warmup_steps = total, warmup
        set_rng_state(state["rng"][rank])
        if rank == 0:
            for error in errors:
                log.warning("%s; using an older checkpoint", error)
            log.warning("resumed from the checkpoint of epoch %d", state["epoch"])
        return state["epoch"] + 1
    raise CheckpointError("; ".join(errors))


def _siblings(latest: ray.train.Checkpoint) -> tuple[list[str], list[str]]:
    """Checkpoint folders beside the latest one, (older newest first, newer): names sort by
    epoch, and Ray registers them in order."""
    import pyarrow.fs as pafs

    parent, _, own = latest.path.rstrip("/").rpartition("/")
    try:
        infos = latest.filesystem.get_file_info(pafs.FileSelector(parent))
    except OSError:
        return [], []
    names = [i for i in infos if i.type == pafs.FileType.Directory
             and i.base_name.startswith("checkpoint_")]
    older = sorted((i.path for i in names if i.base_name < own), reverse=True)
    return older, sorted(i.path for i in names if i.base_name > own)


def _newest_first(latest: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """The latest checkpoint, then the older ones Ray kept beside it (``num_to_keep``)."""
    older, _ = _siblings(latest)
    return [latest, *(ray.train.Checkpoint(p, filesystem=latest.filesystem) for p in older)]


def _unregistered(latest: ray.train.Checkpoint) -> list[str]:
    """Folders newer than Ray's latest checkpoint: written (perhaps in part) by an attempt that
    died before Ray registered them; a resume removes them so nothing ever lists them."""
    return _siblings(latest)[1]


def _epoch_knn(training: Training, epoch: int, device: torch.device) -> float | None:
    """Held-out kNN top-1 every ``eval.knn_every`` epochs and after the last one."""
    cfg = training.cfg
    every = cfg.eval.knn_every
    due = epoch == cfg.optim.epochs - 1 or (every > 0 and (epoch + 1) % every == 0)
    if training.evaluation is None or not due:
        return None
    return distributed_knn(training.engine.net, training.evaluation, cfg, device)


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


def storage_root(cfg: ExperimentConfig) -> str:
    path = cfg.scaling.storage_path
    return path if "://" in path else str(Path(path).expanduser().resolve())


def run_training(
    cfg: ExperimentConfig,
    parent_run_id: str | None = None,
    callbacks: list | None = None,
    run_name: str | None = None,
    tracking_uri: str | None = None,
    tags: dict[str, str] | None = None,
    console: bool = False,
) -> TrainOutcome:
    """Train ``cfg`` on the connected Ray cluster; returns the MLflow run id and final metrics.

    A Tune trial passes ``parent_run_id`` (nests the MLflow run), ``callbacks`` (Tune's
    ``TuneReportCallback``), ``tracking_uri`` (the sweep's server) and ``tags``. ``console``:
    draw a progress bar and a line per epoch (``swav-ray train``).
    """
    check_cluster_resources(cfg)
    name = run_name or cfg.scaling.run_name or default_run_name("swav")
    root = storage_root(cfg)
    run_dir = f"{root}/{name}"
    with RunLock(run_dir) as lock:  # a second process with this run is refused, not mixed in
        tracked = TrackedRun.start(cfg, run_dir, name, parent_run_id, tags, tracking_uri)
        print(f"swav-ray: run {name} ({'resumed' if tracked.resumed else 'new'}), MLflow run "
              f"{tracked.run_id}, checkpoints under {run_dir}", flush=True)
        board = ProgressBoard.remote() if console else None
        make_trainer = _trainer_factory(cfg, name, root, run_dir, tracked,
                                        [Heartbeat(lock), *(callbacks or [])], board)
        if board is None:
            result = _fit_and_log(cfg, make_trainer, run_dir, tracked)
        else:
            with ConsoleProgress(board, cfg.optim.epochs):
                result = _fit_and_log(cfg, make_trainer, run_dir, tracked)
    metrics = dict(result.metrics or {})
    if cfg.eval.final_evaluation or cfg.eval.explain_images:
        # A Ray task, so that on a cluster it runs where a worker would (a GPU node).
        sc = cfg.scaling
        task = ray.remote(_after_training).options(
            num_cpus=sc.cpus_per_worker, num_gpus=1 if sc.use_gpu else 0)
        metrics.update(ray.get(task.remote(tracked.run_id, tracked.uri, cfg.to_dict())))
    return TrainOutcome(tracked.run_id, tracked.uri, metrics, result.checkpoint.path, name)


def default_run_name(experiment: str) -> str:
    """``<experiment>-<YYYYmmdd-HHMMSS>-<6 hex>``: sorted by time, unique within a second."""
    return f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _fit_and_log(cfg: ExperimentConfig, make_trainer, run_dir: str,
                 tracked: TrackedRun) -> ray.train.Result:
    """Fit, log the final model and end the MLflow run: FINISHED, FAILED with the cause, or
    KILLED (interrupted: Ctrl-C)."""
    try:
        result = _fit(make_trainer, cfg.scaling.max_failures, run_dir)
        if result.checkpoint is None:
            raise RuntimeError("training ended without a checkpoint")
        with result.checkpoint.as_directory() as directory:
            state_path = Path(directory) / STATE_FILE
            state = load_state(state_path)
            if cfg.tracking.log_model:
                model = initial_model(cfg)
                model.load_state_dict(state["engine"]["model"])
                tracked.log_model(model.eval())
                tracked.log_artifact(state_path, "checkpoints")
        tracked.client.set_tag(tracked.run_id, "ray_checkpoint", result.checkpoint.path)
    except BaseException as err:
        if isinstance(err, TrainingFailed):
            tracked.client.set_tag(tracked.run_id, "failure_cause", err.cause[:5000])
        tracked.end_if_running("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    tracked.end("FINISHED")
    return result


def _trainer_factory(cfg: ExperimentConfig, name: str, root: str, run_dir: str,
                     tracked: TrackedRun, callbacks: list, board=None):
    """A new TorchTrainer per attempt; the same name and storage make each resume the last."""
    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker, **({"GPU": 1} if sc.use_gpu else {})}

    def make() -> ray.train.torch.TorchTrainer:
        return ray.train.torch.TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": cfg.to_dict(), "run_dir": run_dir, "board": board,
                               "tracking": {"uri": tracked.uri, "run_id": tracked.run_id}},
            scaling_config=ray.train.ScalingConfig(
                num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources),
            run_config=RunConfig(
                name=name, storage_path=root,
                failure_config=FailureConfig(max_failures=0),  # retried by _fit
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                callbacks=[EpochMetricsLogger(tracked.uri, tracked.run_id), *callbacks],
            ),
        )

    return make


def _fit(make_trainer, max_failures: int, run_dir: str) -> ray.train.Result:
    """Fit, and after a worker failure that a retry may cure fit again from the last checkpoint
    (at most ``max_failures`` times). Ray's own retries would also repeat errors that fail the
    same way every time (a config, a data schema, a full disk), at the cost of minutes."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return make_trainer().fit()
        except SystemExit as exc:  # Ray's Ctrl-C handler aborts the run, then exits
            raise KeyboardInterrupt from exc
        except ray.train.TrainingFailedError as err:
            cause, fatal = cause_of(err)
            retry = (fatal is None and isinstance(err, ray.train.WorkerGroupError)
                     and attempt <= max_failures)
            if not retry:
                resumable = run_dir if _has_checkpoints(run_dir) else None
                raise TrainingFailed(cause, fatal, attempt, resumable) from err
            sys.stderr.write(f"swav-ray: attempt {attempt} failed ({cause}); resuming from the "
                             f"last checkpoint ({attempt} of {max_failures} retries)\n")


def _has_checkpoints(run_dir: str) -> bool:
    return "://" in run_dir or any(Path(run_dir).glob("checkpoint_*"))


def _after_training(run_id: str, uri: str, cfg: dict[str, Any]) -> dict[str, float]:
    from orchestration.evaluate import after_training

    return after_training(run_id, uri, from_dict(cfg))

