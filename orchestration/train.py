"""Distributed SwAV training with Ray Train (V2) and MLflow tracking.

Driver (:func:`run_training`): creates or resumes the MLflow run, then fits a ``TorchTrainer``
whose workers run :func:`train_loop_per_worker`: DDP over gloo (CPU) or NCCL (GPU), each worker on
its own contiguous shard, Sinkhorn codes gathered across workers.  Every epoch each worker calls
``ray.train.report``; rank 0 attaches a checkpoint (engine state: model, optimiser, schedule,
queue, iteration; the epoch; every rank's RNG state), written to a temporary file and renamed.  A
worker that dies is replaced (``FailureConfig.max_failures``) and the group resumes from the last
checkpoint; a new ``swav-ray train`` with the same ``scaling.run_name`` and ``storage_path`` resumes
too.  The final model goes to MLflow with the PyTorch flavour.
"""

from __future__ import annotations

import logging
import os
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

from orchestration.checkpoints import (
    STATE_FILE,
    CheckpointError,
    load_state,
    rng_state,
    save_state,
    set_rng_state,
)
from orchestration.config import ConfigError, ExperimentConfig, from_dict
from orchestration.metrics import epoch_report
from orchestration.recipe import Training, build_training, initial_model
from orchestration.tracking import EpochMetricsLogger, TrackedRun
from swav.engine import SwAVEngine
from swav.evaluation import extract_features, knn_predict
from swav.model import SwAVModel

__all__ = ["TrainOutcome", "check_cluster_resources", "run_training", "train_loop_per_worker"]

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
    cfg = from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    training = build_training(cfg, rank, world, device, wrap=ray.train.torch.prepare_model)
    engine = training.engine
    start_epoch = _restore(engine, rank)
    # The same encoder before training: the baseline every kNN figure is compared with.
    init_knn = None
    if start_epoch == 0 and training.evaluation is not None:
        init_knn = distributed_knn(engine.net, training.evaluation, cfg, device)
    images_seen = corrupt_seen = 0
    for epoch in range(start_epoch, cfg.optim.epochs):
        _maybe_fail(cfg, epoch, rank, config.get("run_dir"))
        progress = _progress(rank, epoch, training.steps_per_epoch, engine.iteration)
        stats = training.run_epoch(epoch, on_step=progress)
        images_seen += stats.images
        corrupt_seen += stats.corrupt_images
        if corrupt_seen > cfg.data.max_corrupt_fraction * images_seen:
            raise RuntimeError(
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


def _restore(engine: SwAVEngine, rank: int) -> int:
    """Load the newest readable checkpoint into the engine; the first epoch still to run."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
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


def _newest_first(latest: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """The latest checkpoint, then the older ones Ray kept beside it (``num_to_keep``)."""
    import pyarrow.fs as pafs

    parent, _, own = latest.path.rstrip("/").rpartition("/")
    try:
        infos = latest.filesystem.get_file_info(pafs.FileSelector(parent))
    except OSError:
        return [latest]
    older = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                    and i.base_name.startswith("checkpoint_") and i.base_name < own), reverse=True)
    return [latest, *(ray.train.Checkpoint(p, filesystem=latest.filesystem) for p in older)]


def _epoch_knn(training: Training, epoch: int, device: torch.device) -> float | None:
    """Held-out kNN top-1 every ``eval.knn_every`` epochs and after the last one."""
    cfg = training.cfg
    every = cfg.eval.knn_every
    due = epoch == cfg.optim.epochs - 1 or (every > 0 and (epoch + 1) % every == 0)
    if training.evaluation is None or not due:
        return None
    return distributed_knn(training.engine.net, training.evaluation, cfg, device)


def _progress(rank: int, epoch: int, total: int, first_iteration: int):
    """A coarse progress line on rank 0 (Ray forwards worker output to the driver)."""
    if rank != 0:
        return None
    marks = {max(1, round(total * f)) for f in (0.25, 0.5, 0.75, 1.0)}
    start = time.perf_counter()

    def on_step(iteration: int, loss: torch.Tensor) -> None:
        done = iteration - first_iteration  # the engine counts the step before calling back
        if done in marks:
            # sys.stdout.write, not print: Ray Train patches print() and would show it twice.
            sys.stdout.write(f"epoch {epoch} [{done}/{total}] loss {float(loss):.4f} "
                             f"{time.perf_counter() - start:.1f}s\n")
            sys.stdout.flush()

    return on_step


# -- driver side ------------------------------------------------------------------------------

@dataclass
class TrainOutcome:
    run_id: str
    tracking_uri: str
    metrics: dict[str, Any]
    checkpoint_path: str | None
    run_name: str


def check_cluster_resources(cfg: ExperimentConfig) -> None:
    """More workers/GPUs than the cluster has: a clear error instead of a hang."""
    total = ray.cluster_resources()
    sc = cfg.scaling
    need_cpu = sc.num_workers * sc.cpus_per_worker
    if need_cpu > total.get("CPU", 0):
        raise ConfigError(
            f"scaling.num_workers: {sc.num_workers} workers x {sc.cpus_per_worker:g} CPU need "
            f"{need_cpu:g} CPUs, the Ray cluster has {total.get('CPU', 0):g}")
    if sc.use_gpu and sc.num_workers > total.get("GPU", 0):
        raise ConfigError(
            f"scaling.use_gpu: {sc.num_workers} workers need {sc.num_workers} GPUs, the Ray "
            f"cluster has {total.get('GPU', 0):g}")


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
) -> TrainOutcome:
    """Train ``cfg`` on the connected Ray cluster; returns the MLflow run id and final metrics.

    A Tune trial passes ``parent_run_id`` (nests the MLflow run), ``callbacks`` (Tune's
    ``TuneReportCallback``), ``tracking_uri`` (the sweep's server) and ``tags``.
    """
    check_cluster_resources(cfg)
    name = run_name or cfg.scaling.run_name or time.strftime("swav-%Y%m%d-%H%M%S")
    root = storage_root(cfg)
    run_dir = f"{root}/{name}"
    tracked = TrackedRun.start(cfg, run_dir, name, parent_run_id, tags, tracking_uri)
    print(f"swav-ray: run {name} ({'resumed' if tracked.resumed else 'new'}), MLflow run "
          f"{tracked.run_id}, checkpoints under {run_dir}", flush=True)
    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker, **({"GPU": 1} if sc.use_gpu else {})}
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "run_dir": run_dir},
        scaling_config=ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                               resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=root,
            failure_config=FailureConfig(max_failures=sc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[EpochMetricsLogger(tracked.uri, tracked.run_id), *(callbacks or [])],
        ),
    )
    try:
        result = trainer.fit()
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
    except BaseException:
        tracked.end_if_running("FAILED")
        raise
    tracked.end("FINISHED")
    metrics = dict(result.metrics or {})
    if cfg.eval.final_evaluation or cfg.eval.explain_images:
        # A Ray task, so that on a cluster it runs where a worker would (a GPU node).
        task = ray.remote(_after_training).options(
            num_cpus=sc.cpus_per_worker, num_gpus=1 if sc.use_gpu else 0)
        metrics.update(ray.get(task.remote(tracked.run_id, tracked.uri, cfg.to_dict())))
    return TrainOutcome(tracked.run_id, tracked.uri, metrics, result.checkpoint.path, name)


def _after_training(run_id: str, uri: str, cfg: dict[str, Any]) -> dict[str, float]:
    from orchestration.evaluate import after_training

    return after_training(run_id, uri, from_dict(cfg))

