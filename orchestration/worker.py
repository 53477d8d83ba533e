"""One Ray Train worker of a SwAV run (:func:`train_loop_per_worker`), the driver's counterpart in
:mod:`orchestration.train`.

Each worker builds its share of the run through the one recipe (:func:`build_training`: its own
contiguous shard, DDP over gloo or NCCL, Sinkhorn codes gathered across workers), resumes from the
newest readable checkpoint Ray hands it, and every epoch reports the metric vocabulary; rank 0
attaches a checkpoint (engine state, the epoch, every rank's RNG state), written to a temporary
file and renamed.  Errors no retry can cure leave as ``NotRetryable``.

This module imports no MLflow: worker processes start for every run (and every Tune trial), and
what they import is paid each time.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from orchestration.checkpoint_folders import (
    FolderNames,
    newest_first,
    unregistered,
    upload_whole,
)
from orchestration.checkpoints import (
    STATE_FILE,
    CheckpointError,
    load_state,
    rng_state,
    save_state,
    set_rng_state,
)
from orchestration.config import ExperimentConfig, from_dict
from orchestration.failures import as_not_retryable
from orchestration.metrics import epoch_report
from orchestration.progress import StepPoster
from orchestration.recipe import Training, build_training
from orchestration.system_metrics import node_monitor
from orchestration.time_budget import TrainingClock, plan_run
from swav.data import missing_locally
from swav.engine import SwAVEngine
from swav.evaluation import extract_features, knn_predict
from swav.model import SwAVModel

__all__ = ["FAILURE_MARKER", "FAIL_AT_EPOCH", "distributed_knn", "train_loop_per_worker"]

log = logging.getLogger(__name__)
# Fault injection for the tests, outside the user's config: with this variable set in the
# driver's environment, one worker dies hard once at the start of that epoch (the marker file in
# the run's folder says it did).
FAIL_AT_EPOCH = "SWAV_RAY_FAIL_AT_EPOCH"
FAILURE_MARKER = "injected_failure"


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
    features are all-gathered into one bank, and the correct counts are summed.

    Eager even where ``model.compile`` compiled the backbone for training: its static graphs
    would otherwise be recompiled for eval mode and for every other batch size."""
    bank_loader, query_loader, n_classes = evaluation
    with torch.compiler.set_stance("force_eager"):
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


def _worker_nodes() -> str:
    """The Ray nodes the run's workers are on (their IDs, sorted, comma-separated), as every
    worker knows them."""
    own = ray.get_runtime_context().get_node_id()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, own)
        return ",".join(sorted(set(everyone)))
    return own


def _all_rng_states() -> list[dict[str, Any]]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        states: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(states, rng_state())
        return states
    return [rng_state()]


def _maybe_fail(config: dict[str, Any], cfg: ExperimentConfig, epoch: int, rank: int) -> None:
    """Test-only (:data:`FAIL_AT_EPOCH`): rank 1 (or 0 alone) dies hard once at that epoch."""
    run_dir = config.get("run_dir")
    if config.get("fail_at_epoch") != epoch or run_dir is None or "://" in run_dir:
        return
    marker = Path(run_dir) / FAILURE_MARKER
    if rank == min(1, cfg.scaling.num_workers - 1) and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"rank {rank} killed at epoch {epoch}\n")
        # First let the controller take the reports already made (it polls the workers every
        # 0.25 s here): on a loaded machine it once had registered only epoch 0 of the three
        # reported when it saw the death, and the tests rely on the last registered epoch.
        time.sleep(1.0)
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
    begun = time.perf_counter()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    d = cfg.data
    if missing_locally(d.source, d.path, d.download):  # (on a cluster the driver cannot tell)
        raise ValueError(f"data.path: {d.path!r} does not exist on node {socket.gethostname()}")
    training = build_training(cfg, rank, world, device, wrap=ray.train.torch.prepare_model,
                              start=config.get("init"))  # model.init, read by the driver
    engine = training.engine
    epoch, clock, names = _restore(engine, rank)
    planned = _plan(training, epoch, clock)
    board = config.get("board")  # the driver's console (swav-ray train), else None
    # The same encoder before training: the baseline every kNN figure is compared with.
    init_knn = None
    if epoch == 0 and training.evaluation is not None:
        init_knn = distributed_knn(engine.net, training.evaluation, cfg, device)
    nodes = _worker_nodes()
    setup_s: float | None = time.perf_counter() - begun  # (reported with the first epoch)
    images_seen = corrupt_seen = 0
    while epoch < planned:
        _maybe_fail(config, cfg, epoch, rank)
        poster = None
        if board is not None and rank == 0:
            poster = StepPoster(board, epoch, training.steps_per_epoch, engine.iteration,
                                cfg.optim.batch_size)
        started = time.perf_counter()
        stats = training.run_epoch(epoch, on_step=poster)  # (its figures wait for the device)
        clock.add_epoch(time.perf_counter() - started, device)
        planned = _plan(training, epoch + 1, clock)
        images_seen += stats.images
        corrupt_seen += stats.corrupt_images
        if corrupt_seen > cfg.data.max_corrupt_fraction * images_seen:
            raise ValueError(
                f"data: {corrupt_seen} of {images_seen} images failed to decode, more than "
                f"data.max_corrupt_fraction={cfg.data.max_corrupt_fraction}")
        report = epoch_report(stats, _epoch_knn(training, epoch, planned, device),
                              init_knn if epoch == 0 else None, epochs_planned=planned,
                              training_s=clock.trained_s, setup_s=setup_s)
        if setup_s is not None:  # this attempt's first report: where its workers run
            report["nodes"] = nodes
        setup_s = None
        if epoch in names.retrained:  # (its first report came from the unreadable checkpoint)
            report["retrained"] = True
        _report_with_checkpoint(report, engine, epoch, clock, rank, config, names.name(epoch))
        if poster is not None:
            board.post_epoch.remote(report)
        epoch += 1


def _plan(training: Training, done: int, clock: TrainingClock) -> int:
    """Epochs the run trains: ``optim.epochs``, or what fits ``optim.time_budget_s``."""
    o = training.cfg.optim
    planned, capped = plan_run(o, training.engine, clock, done, training.steps_per_epoch)
    if capped and clock.epochs == 2 and training.rank == 0:  # once, at the first plan
        log.warning("optim.time_budget_s: %g s fit more than optim.epochs=%d epochs; the run "
                    "ends after %d (raise optim.epochs, and warmup_epochs with it to keep the "
                    "warmup's share)", o.time_budget_s, o.epochs, o.epochs)
    return planned


def _report_with_checkpoint(report: dict[str, Any], engine: SwAVEngine, epoch: int,
                            clock: TrainingClock, rank: int, config: dict[str, Any],
                            name: str) -> None:
    """Report the epoch; rank 0 attaches the checkpoint (every rank's RNG state in it), which
    reaches the storage whole or not at all, as folder ``name``."""
    rng = _all_rng_states()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            save_state(Path(tmp), {"engine": engine.state_dict(), "epoch": epoch, "rng": rng,
                                   "clock": clock.state_dict(), "config": config["cfg"]})
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        # Named by epoch: the previous checkpoint (a fallback) is the next name down.
        ray.train.report(report, checkpoint=ckpt, checkpoint_dir_name=name,
                         checkpoint_upload_fn=upload_whole)


def _restore(engine: SwAVEngine, rank: int) -> tuple[int, TrainingClock, FolderNames]:
    """Load the newest readable checkpoint into the engine; the first epoch still to run, the
    training time so far and the names the next checkpoints take."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, TrainingClock(), FolderNames()
    if rank == 0:
        for path in unregistered(checkpoint):
            checkpoint.filesystem.delete_dir(path)
            log.warning("removed %s: written but never registered by Ray", path)
    errors: list[str] = []
    unreadable: list[str] = []
    for candidate in newest_first(checkpoint):
        with candidate.as_directory() as directory:
            try:
                state = load_state(Path(directory) / STATE_FILE,
                                   f"{candidate.path}/{STATE_FILE}")
            except CheckpointError as err:
                errors.append(str(err))
                unreadable.append(candidate.path)
                continue
        # The schedule's length stays the one built from this config (its plan is not in the
        # state): a resume may extend optim.epochs, and the cosine stretches to the new end.
        engine.load_state_dict(state["engine"])
        set_rng_state(state["rng"][rank])
        names = FolderNames.after_restore(checkpoint, state["epoch"], unreadable)
        if rank == 0:
            for error in errors:
                log.warning("%s; using an older checkpoint", error)
            log.warning("resumed from the checkpoint of epoch %d", state["epoch"])
        return state["epoch"] + 1, TrainingClock.from_state(state.get("clock")), names
    raise CheckpointError(f"checkpoint: no kept checkpoint of the run loads ({'; '.join(errors)})")


def _epoch_knn(training: Training, epoch: int, planned: int,
               device: torch.device) -> float | None:
    """Held-out kNN top-1 every ``eval.knn_every`` epochs and after the last (``planned``) one."""
    cfg = training.cfg
    every = cfg.eval.knn_every
    due = epoch == planned - 1 or (every > 0 and (epoch + 1) % every == 0)
    if training.evaluation is None or not due:
        return None
    return distributed_knn(training.engine.net, training.evaluation, cfg, device)
