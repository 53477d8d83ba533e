"""Every check that runs before Ray starts, each a small named function, in one fixed order.

A bad input must cost one line naming its key and exit code 2, not a Ray start and a worker
failure per retry.  :func:`validate` checks a config's values (building the pure SwAV components
once, through the same recipe a run uses); :func:`check_train` and :func:`check_sweep` then ask
the machine and the services: room for the workers, the data, the tracking server, the
backbone's starting weights (``model.init``), the storage, a resumed run's stored config.
Everything here runs on the driver; a cluster's workers check what only they can see (their
node's ``data.path``) themselves.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestration import recipe
from orchestration.config import (
    ConfigError,
    ExperimentConfig,
    OptimConfig,
    build_config,
    load_config,
)
from orchestration.pretrained import starting_weights
from swav.counterfactual import METHODS, TARGET_MODES
from swav.data import SOURCES, SourceSplits, missing_locally
from swav.evaluation import LINEAR_METHODS
from swav.model import build_model
from swav.optim import build_optimizer
from swav.queue import per_worker_length

__all__ = ["check_local_capacity", "check_storage", "check_sweep", "check_train", "largest_trial",
           "load_experiment", "validate"]

CROP_DEVICES = ("auto", "cpu", "gpu")
CHEAP_TO_OPEN = ("digits", "parquet", "imagefolder")  # metadata, one column or a file listing
PROBE_BYTES = 1 << 20  # written for real: an empty file needs no room on a full disk


def load_experiment(config: str | os.PathLike | None = None,
                    overrides: list[str] | None = None) -> ExperimentConfig:
    """An experiment file with overrides, loaded and validated (what every command starts from)."""
    return validate(load_config(config, overrides))


def experiment_from(data: dict[str, Any], overrides: list[str] | None = None
                    ) -> ExperimentConfig:
    """A validated config from a (partial) nested dict and dotted overrides."""
    return validate(build_config(data, overrides))


# -- the config's values ----------------------------------------------------------------------

def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Fail on the first bad value, naming its key; returns ``cfg``."""
    sc, o = cfg.scaling, cfg.optim
    _check(sc.num_workers >= 1, "scaling.num_workers", f"must be >= 1, got {sc.num_workers}")
    _check(o.batch_size >= 1, "optim.batch_size", f"must be >= 1, got {o.batch_size}")
    check_components(cfg)
    try:
        per_worker_length(cfg.swav.queue_length, o.batch_size, sc.num_workers)
    except ValueError as err:
        raise ConfigError(f"swav.{err}") from None
    _check(cfg.swav.freeze_prototypes_iters >= 0, "swav.freeze_prototypes_iters", "must be >= 0")
    _check(cfg.swav.epoch_queue_starts >= 0, "swav.epoch_queue_starts", "must be >= 0")
    _check_schedule(o)
    _check(cfg.crops.device in CROP_DEVICES, "crops.device",
           f"expected {', '.join(CROP_DEVICES)}, got {cfg.crops.device!r}")
    _check_compile_mode(cfg)
    _check_data_section(cfg)
    _check(sc.cpus_per_worker > 0, "scaling.cpus_per_worker", "must be > 0")
    _check(sc.max_failures >= 0, "scaling.max_failures", f"must be >= 0, got {sc.max_failures}")
    _check(not cfg.tracking.register_model or cfg.tracking.log_model,
           "tracking.register_model", "needs tracking.log_model=true (the model it registers)")
    _check(cfg.tracking.system_metrics_every_s > 0, "tracking.system_metrics_every_s",
           "must be > 0")
    _check_eval_section(cfg)
    return cfg


def check_components(cfg: ExperimentConfig) -> None:
    """Build the pure components once (crops, loss, model on the meta device, optimiser): a bad
    value fails with its component's ValueError, whose message starts with the key."""
    def section(name: str, build) -> None:
        try:
            build()
        except ValueError as err:
            raise ConfigError(f"{name}.{err}") from None

    section("crops", lambda: recipe.crop_transform(cfg))
    try:
        recipe.build_loss(cfg)
    except ValueError as err:
        name = "crops" if str(err).startswith(("crops_for_assign", "nmb_crops")) else "swav"
        raise ConfigError(f"{name}.{err}") from None
    section("model", lambda: _build_on_meta(recipe.model_kwargs(cfg)))
    section("optim", lambda: build_optimizer(nn.Linear(1, 1), cfg.optim.name, cfg.optim.lr,
                                             cfg.optim.weight_decay, cfg.optim.momentum))


_BUILT_ON_META: set[str] = set()  # model sections already built (a sweep validates many configs)


def _build_on_meta(kwargs: dict[str, Any]) -> None:
    """The model on the meta device: shapes and arguments only, no memory, no initialisation."""
    key = repr(sorted(kwargs.items()))
    if key in _BUILT_ON_META:
        return
    with torch.device("meta"):
        build_model(**kwargs)
    _BUILT_ON_META.add(key)


def _check_schedule(o: OptimConfig) -> None:
    _check(o.final_lr >= 0, "optim.final_lr", f"must be >= 0, got {o.final_lr}")
    _check(o.start_warmup >= 0, "optim.start_warmup", f"must be >= 0, got {o.start_warmup}")
    _check(o.epochs >= 1, "optim.epochs", f"must be >= 1, got {o.epochs}")
    _check(0 <= o.warmup_epochs <= o.epochs, "optim.warmup_epochs",
           f"must be in [0, optim.epochs={o.epochs}], got {o.warmup_epochs}")
    _check(o.time_budget_s is None or o.time_budget_s > 0, "optim.time_budget_s",
           f"must be > 0 seconds or null, got {o.time_budget_s}")


def _check_compile_mode(cfg: ExperimentConfig) -> None:
    """``model.compile_mode`` is the mode of ``model.compile``: unused while that is false, so
    that ``model.compile=false`` alone turns off an experiment's compiled model."""
    m, sc = cfg.model, cfg.scaling
    _check(m.compile_mode in recipe.COMPILE_MODES, "model.compile_mode",
           f"expected {', '.join(recipe.COMPILE_MODES)}, got {m.compile_mode!r}")
    # Under DDP, SyncBatchNorm's collectives run inside the backbone and the gradients' all-reduce
    # hooks on them: neither is made to be replayed as a CUDA graph.
    graphs = m.compile and m.compile_mode in recipe.CUDA_GRAPH_MODES
    _check(not graphs or not sc.use_gpu or sc.num_workers == 1, "model.compile_mode",
           f"{m.compile_mode} replays CUDA graphs, on one GPU worker only; got "
           f"scaling.num_workers={sc.num_workers} (model.compile_mode=default compiles for more)")


def _check_data_section(cfg: ExperimentConfig) -> None:
    d = cfg.data
    _check(d.source in SOURCES, "data.source",
           f"unknown source {d.source!r}, expected one of {', '.join(SOURCES)}")
    if d.source in ("imagefolder", "parquet"):
        _check(d.path is not None, "data.path", f"required for source {d.source!r}")
    if not os.environ.get("RAY_ADDRESS"):  # on a cluster the workers read it: checked there
        _check(not missing_locally(d.source, d.path, d.download), "data.path",
               f"{d.path!r} does not exist")
    _check(0 < d.holdout_fraction < 1, "data.holdout_fraction",
           f"must be in (0, 1), got {d.holdout_fraction}")
    _check(d.limit is None or d.limit >= 1, "data.limit", f"must be >= 1, got {d.limit}")
    _check(0 <= d.max_corrupt_fraction <= 1, "data.max_corrupt_fraction",
           f"must be in [0, 1], got {d.max_corrupt_fraction}")
    _check(d.loader_workers >= 0, "data.loader_workers", f"must be >= 0, got {d.loader_workers}")
    _check(d.eval_size is None or d.eval_size >= 1, "data.eval_size", "must be >= 1")


def _check_eval_section(cfg: ExperimentConfig) -> None:
    e = cfg.eval
    _check(e.knn_k >= 1, "eval.knn_k", f"must be >= 1, got {e.knn_k}")
    _check(e.knn_temperature > 0, "eval.knn_temperature", "must be > 0")
    _check(e.knn_every >= 0, "eval.knn_every", f"must be >= 0, got {e.knn_every}")
    _check(e.linear_method in LINEAR_METHODS, "eval.linear_method",
           f"expected {', '.join(LINEAR_METHODS)}, got {e.linear_method!r}")
    _check(e.max_train_images is None or e.max_train_images >= 1, "eval.max_train_images",
           "must be >= 1")
    _check(e.explain_images >= 0, "eval.explain_images", f"must be >= 0, got {e.explain_images}")
    _check(e.explain_target in TARGET_MODES or (
        isinstance(e.explain_target, int) and e.explain_target >= 0), "eval.explain_target",
        f"expected {', '.join(TARGET_MODES)} or a prototype index, got {e.explain_target!r}")
    bad = [m for m in e.explain_methods if m not in METHODS]
    _check(not bad, "eval.explain_methods",
           f"unknown method(s) {bad}, expected one of {', '.join(METHODS)}")


# -- the machine and the services -------------------------------------------------------------

def check_train(cfg: ExperimentConfig, run_name: str) -> SourceSplits | None:
    """What ``swav-ray train`` checks once its config is valid, in this order; returns the data
    it opened (the run draws its crops figure from it), or None where it opened none."""
    from orchestration.checkpoints import storage_root

    check_local_capacity(cfg)
    splits = check_data(cfg)
    check_tracking(cfg)
    starting_weights(cfg)  # model.init: read and matched to the backbone (kept for the run)
    check_storage(cfg.scaling.storage_path)
    if cfg.scaling.run_name:
        check_resumable(cfg, f"{storage_root(cfg)}/{run_name}", run_name)
    return splits


def check_sweep(spec) -> None:
    """What ``swav-ray tune`` checks once its sweep file is valid (every trial's config is
    validated by :func:`orchestration.sweep.load_sweep`): as ``train`` checks its run, for the
    largest trial and the base experiment's data and storage."""
    base = spec.base_config()
    check_local_capacity(largest_trial(spec))
    check_data(base)
    check_tracking(base)
    starting_weights(base)
    check_storage(base.scaling.storage_path)


def largest_trial(spec) -> ExperimentConfig:
    """The sweep's base config with the most workers and CPUs per worker any trial asks for."""
    cfg = spec.base_config()
    for dim in spec.dimensions:
        if dim.key in ("scaling.num_workers", "scaling.cpus_per_worker"):
            setattr(cfg.scaling, dim.key.split(".")[1], max(dim.representatives()))
    return cfg


def check_local_capacity(cfg: ExperimentConfig) -> None:
    """Without RAY_ADDRESS the run starts a Ray instance on this machine: workers beyond its CPUs
    or GPUs are refused here (on a cluster, once connected: :mod:`orchestration.capacity`)."""
    if os.environ.get("RAY_ADDRESS"):
        return
    sc = cfg.scaling
    cpus, need = os.cpu_count() or 1, sc.num_workers * sc.cpus_per_worker
    if need > cpus:
        raise ConfigError(f"scaling.num_workers: {sc.num_workers} workers x "
                          f"{sc.cpus_per_worker:g} CPU need {need:g} CPUs, this machine has "
                          f"{cpus} (set RAY_ADDRESS to train on a cluster)")
    if sc.use_gpu:
        import torch

        gpus = torch.cuda.device_count()
        if sc.num_workers > gpus:
            raise ConfigError(f"scaling.use_gpu: {sc.num_workers} workers need "
                              f"{sc.num_workers} GPUs, this machine has {gpus}")


def check_data(cfg: ExperimentConfig) -> SourceSplits | None:
    """Open the data source where that is cheap, so that a missing bucket or file, a missing
    column, non-integer or missing labels, or a shard smaller than one step fail once, as one
    line (in the workers they would fail on every retry). Parquet, local or in object storage,
    is read as metadata and the label column, not images. Large downloads and a cluster's
    worker-side local paths are left to the workers: None."""
    d = cfg.data
    if d.source not in CHEAP_TO_OPEN or missing_locally(d.source, d.path, d.download):
        return None
    try:
        splits = recipe.open_splits(cfg)
    except ValueError as err:
        raise ConfigError(f"data.{err}") from None
    n, workers = len(splits.train), cfg.scaling.num_workers  # type: ignore[arg-type]
    if n // workers < cfg.optim.batch_size:
        raise ConfigError(f"optim.batch_size: {cfg.optim.batch_size} images per step exceed the "
                          f"{n // workers} images of each worker's shard ({n} training images "
                          f"over {workers} workers)")
    return splits


def check_tracking(cfg: ExperimentConfig) -> None:
    """The tracking URI is well formed and, for a server, answers."""
    from orchestration.tracking import check_reachable, resolve_tracking_uri

    check_reachable(resolve_tracking_uri(cfg.tracking.tracking_uri))


def check_storage(storage_path: str) -> None:
    """A local ``scaling.storage_path`` where this process cannot create the run folders, or
    with no room for a MiB. Tried for real (a probe file written and flushed, missing folders
    made and then removed again), as permission bits say nothing for root or on a read-only
    mount; URIs such as ``s3://`` are left to the workers that write there."""
    if "://" in storage_path:
        return
    path = Path(storage_path).expanduser().absolute()
    if path.is_file():
        raise ConfigError(f"scaling.storage_path: {path} is a file, not a directory")
    missing = []  # deepest first
    parent = path
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    probe = None
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=path, prefix=".swav-ray-probe-")
        with os.fdopen(handle, "wb") as f:
            f.write(bytes(PROBE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        what = "has no room left" if err.errno in (errno.ENOSPC, errno.EDQUOT) else \
            "is not writable"
        raise ConfigError(f"scaling.storage_path: {path} {what} "
                          f"({err.strerror or err})") from None
    finally:
        if probe is not None:
            Path(probe).unlink(missing_ok=True)
        for folder in missing:
            try:
                folder.rmdir()
            except OSError:
                break


def check_resumable(cfg: ExperimentConfig, run_dir: str, run_name: str) -> None:
    """A run of this name that exists with another config: refused (one line listing the keys),
    as the run itself would refuse it once Ray had started."""
    from mlflow.tracking import MlflowClient

    from orchestration.tracking import (
        RUN_ID_FILE,
        check_resume,
        read_text,
        resolve_tracking_uri,
    )

    run_id = read_text(f"{run_dir}/{RUN_ID_FILE}")
    if run_id:
        check_resume(MlflowClient(resolve_tracking_uri(cfg.tracking.tracking_uri)), run_id, cfg,
                     run_name)
