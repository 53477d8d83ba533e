"""The composition root: one experiment config -> every component of a SwAV run.

Data splits and shards, the multi-crop and evaluation transforms, loaders, model, loss, optimiser
and schedule, the engine and the evaluation sets are built here and nowhere else.  Ray Train
workers, Tune trials, ``swav-ray evaluate``/``explain``, config validation and the benches all call
it.  Pure PyTorch: no Ray, no MLflow (a bare GPU box runs it).

Batch semantics: ``optim.batch_size`` is per Ray worker, so the *global* batch is
``batch_size * scaling.num_workers``.  A run with ``world`` processes gives each
``global / world`` images per step; one process (a bench) therefore trains on the same global
batch the Ray run does, and the Sinkhorn codes, gathered over workers, are the same.

The checks that run before Ray starts (:mod:`orchestration.preflight`) build the components
through this module too, so that a bad value fails as the run would fail on it.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from orchestration.config import ExperimentConfig
from swav.batch_multicrop import BatchMultiCrop
from swav.data import (
    Batch,
    SourceSplits,
    Transformed,
    collate_eval,
    collate_skipping_corrupt,
    eval_transform,
    open_source,
    shard,
    subset,
)
from swav.engine import EpochStats, SwAVEngine, convert_sync_batchnorm
from swav.kept_batches import KeptBatches
from swav.loss import SwAVLoss
from swav.model import SwAVModel, build_model
from swav.multicrop import MultiCropTransform
from swav.optim import build_optimizer, build_scheduler
from swav.raw_batches import (
    RawBatch,
    ResidentBatches,
    collate_uint8,
    resident_images,
    to_uint8,
)

__all__ = [
    "EvalSets",
    "Training",
    "batch_crop_transform",
    "build_loss",
    "build_training",
    "compile_model",
    "crop_transform",
    "crops_on_device",
    "eval_image_size",
    "eval_loaders",
    "eval_sets",
    "initial_model",
    "model_kwargs",
    "open_splits",
    "per_process_batch",
    "plain_transform",
    "replays_cuda_graphs",
    "use_cudnn_benchmark",
]

EVAL_BATCH = 256


# -- data -------------------------------------------------------------------------------------

def open_splits(cfg: ExperimentConfig) -> SourceSplits:
    """The source's raw training and held-out sets (``data`` section; split seeded by the run)."""
    d = cfg.data
    return open_source(d.source, d.path, d.download, d.image_column, d.label_column,
                       d.holdout_fraction, cfg.scaling.seed, d.limit, d.class_names)


def crop_transform(cfg: ExperimentConfig) -> MultiCropTransform:
    c = cfg.crops
    return MultiCropTransform(c.nmb_crops, c.size_crops, c.min_scale_crops, c.max_scale_crops,
                              mean=c.mean, std=c.std, color_strength=c.color_strength,
                              blur_prob=c.blur_prob, flip_prob=c.flip_prob,
                              solarize_prob=c.solarize_prob)


def crops_on_device(cfg: ExperimentConfig, device: torch.device, resident: bool = False) -> bool:
    """``crops.device``: batched crops on the training device. ``auto``: on a GPU always; on the
    CPU when the training shard is ``resident`` (a small data set, decoded once into memory),
    where per-image PIL crops cost more than the step itself (BENCHMARKS.md); a streamed shard
    keeps PIL in the loader workers there."""
    mode = cfg.crops.device
    return mode == "gpu" or (mode == "auto" and (device.type == "cuda" or resident))


def batch_crop_transform(cfg: ExperimentConfig, device: torch.device,
                         seed: int = 0) -> BatchMultiCrop:
    """Multi-crop on the device, in the memory format the engine feeds the model; compiled
    (``crops.compile``) on a GPU only: on 2 CPU cores the fused version was no faster."""
    c = cfg.crops
    channels_last = cfg.model.channels_last and device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return BatchMultiCrop(c.nmb_crops, c.size_crops, c.min_scale_crops, c.max_scale_crops,
                          mean=c.mean, std=c.std, color_strength=c.color_strength,
                          blur_prob=c.blur_prob, flip_prob=c.flip_prob,
                          solarize_prob=c.solarize_prob, seed=seed,
                          memory_format=memory_format,
                          compile=c.compile and device.type == "cuda")


def eval_image_size(cfg: ExperimentConfig) -> int:
    """The side of the images a run evaluates (and its exported model is shown)."""
    return cfg.data.eval_size or cfg.crops.size_crops[0]


def plain_transform(cfg: ExperimentConfig) -> Callable:
    """The evaluation view of the config's images (no augmentation)."""
    return eval_transform(eval_image_size(cfg), cfg.crops.mean, cfg.crops.std)


def per_process_batch(cfg: ExperimentConfig, world: int) -> int:
    """Images per step of each of ``world`` processes for the config's global batch."""
    total = cfg.optim.batch_size * cfg.scaling.num_workers
    if total % world:
        raise ValueError(f"optim.batch_size: the global batch of {total} images does not split "
                         f"over {world} processes")
    return total // world


def _loaded(dataset: Dataset) -> Dataset:
    if hasattr(dataset, "load"):
        dataset.load()  # Parquet: read this shard's row groups once, before loader workers fork
    return dataset


def train_loader(cfg: ExperimentConfig, splits: SourceSplits, rank: int, world: int,
                 device: torch.device) -> DataLoader | ResidentBatches:
    """Batches of this process's contiguous shard of the training set: multi-crop batches made
    by loader workers, or (crops on the device) uint8 images, resident on the device when the
    shard fits (:func:`swav.raw_batches.resident_images`), else decoded by loader workers."""
    batch = per_process_batch(cfg, world)
    own = _loaded(shard(splits.train, rank, world))
    if len(own) < batch:  # type: ignore[arg-type]
        raise ValueError(f"optim.batch_size: {batch} images per step exceed the {len(own)} "
                         f"images of each worker's shard")
    workers = cfg.data.loader_workers
    seed = cfg.scaling.seed + rank
    if crops_on_device(cfg, device, resident=True):  # batched if the shard is kept
        resident = resident_images(own, workers)
        if resident is not None:
            return ResidentBatches(resident[0], batch, device, seed, dropped=resident[1])
    on_device = crops_on_device(cfg, device)
    dataset = Transformed(own, to_uint8 if on_device else crop_transform(cfg))
    return DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                      collate_fn=collate_uint8 if on_device else collate_skipping_corrupt,
                      generator=torch.Generator().manual_seed(seed),
                      num_workers=workers, persistent_workers=workers > 0,
                      pin_memory=device.type == "cuda")


@dataclass
class EvalSets:
    """Evaluation view of the kNN/linear bank (training images) and of the held-out images."""

    bank: Dataset
    heldout: Dataset
    n_classes: int
    class_names: list[str] | None = None  # label i's name, where the data names them


def eval_sets(cfg: ExperimentConfig, splits: SourceSplits) -> EvalSets | None:
    """The labelled evaluation sets, or None when the source has no labelled held-out set.

    The bank holds at most ``eval.max_train_images`` training images, evenly spaced, so that the
    per-epoch kNN of a run and ``swav-ray evaluate`` measure on the same images.
    """
    if splits.heldout is None or splits.n_classes is None:
        return None
    bank = splits.train
    limit = cfg.eval.max_train_images
    if limit is not None and len(bank) > limit:  # type: ignore[arg-type]
        step = len(bank) / limit  # type: ignore[arg-type]
        bank = subset(bank, np.array([int(i * step) for i in range(limit)]))
    plain = plain_transform(cfg)
    return EvalSets(Transformed(bank, plain), Transformed(splits.heldout, plain),
                    splits.n_classes, splits.class_names)


def eval_loaders(cfg: ExperimentConfig, sets: EvalSets, rank: int = 0,
                 world: int = 1) -> tuple[DataLoader, DataLoader]:
    """Loaders over this process's shard of the bank and of the held-out set."""
    def loader(dataset: Transformed) -> DataLoader:
        if world > 1:
            dataset = Transformed(_loaded(shard(dataset.base, rank, world)), dataset.transform)
        return DataLoader(dataset, batch_size=EVAL_BATCH, collate_fn=collate_eval,
                          num_workers=cfg.data.loader_workers)

    return loader(sets.bank), loader(sets.heldout)  # type: ignore[arg-type]


# -- model, loss, optimisation ----------------------------------------------------------------

# ``model`` keys that change how the model runs, not what it computes.
HOW_IT_RUNS = ("channels_last", "compile", "compile_mode", "cudnn_benchmark")
STARTING_POINT = ("init",)  # the weights it starts from (orchestration/pretrained.py)


def model_kwargs(cfg: ExperimentConfig) -> dict[str, Any]:
    """The ``model`` section as :func:`swav.model.build_model` arguments (the architecture, not
    :data:`HOW_IT_RUNS`, nor the :data:`STARTING_POINT`)."""
    return {k: v for k, v in dataclasses.asdict(cfg.model).items()
            if k not in HOW_IT_RUNS + STARTING_POINT}


def initial_model(cfg: ExperimentConfig,
                  start: dict[str, torch.Tensor] | None = None) -> SwAVModel:
    """The model at its seeded initialisation, the backbone loaded with ``start`` (the tensors
    ``model.init`` names, matched by orchestration.pretrained) if given: what training starts
    from. Without ``start``: the random-init baseline every figure is compared with."""
    torch.manual_seed(cfg.scaling.seed)
    model = build_model(**model_kwargs(cfg))
    if start:
        model.backbone.load_state_dict(start, strict=False)
    return model


def build_loss(cfg: ExperimentConfig) -> SwAVLoss:
    c, s = cfg.crops, cfg.swav
    return SwAVLoss(sum(c.nmb_crops), c.crops_for_assign, s.temperature, s.epsilon,
                    s.sinkhorn_iterations, gather=True)


def build_optimization(cfg: ExperimentConfig, model: nn.Module, steps_per_epoch: int):
    """Optimiser and per-iteration warmup + cosine schedule of the ``optim`` section."""
    o = cfg.optim
    optimizer = build_optimizer(model, o.name, o.lr, o.weight_decay, o.momentum)
    scheduler = build_scheduler(optimizer, total_steps=o.epochs * steps_per_epoch,
                                warmup_steps=round(o.warmup_epochs * steps_per_epoch),
                                final_lr=o.final_lr, start_lr=o.start_warmup)
    return optimizer, scheduler


# torch.compile's modes (``model.compile_mode``), and those that replay the compiled model as
# CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_model(model: SwAVModel, cfg: ExperimentConfig, device: torch.device) -> bool:
    """``model.compile``: ``torch.compile`` the backbone and the projection head in place (their
    parameters and state-dict keys stay; each compiles at its first call per input shape, which
    :func:`build_engine` makes at set-up through ``SwAVEngine.warm_up``), on a GPU only, as
    ``crops.compile``. Returns whether it did.

    Static shapes (``dynamic=False``), one graph per crop size as for the crops: a run has a few
    fixed shapes, and with torch's default the second crop size recompiles the model for symbolic
    shapes, which ran slower than the eager step (BENCHMARKS.md). ``model.compile_mode`` is
    torch.compile's ``mode``."""
    if not (cfg.model.compile and device.type == "cuda"):
        return False
    model.backbone.compile(dynamic=False, mode=cfg.model.compile_mode)
    model.projection_head.compile(dynamic=False, mode=cfg.model.compile_mode)
    return True


def replays_cuda_graphs(cfg: ExperimentConfig, device: torch.device) -> bool:
    """Whether the compiled model replays CUDA graphs (``model.compile_mode``
    ``reduce-overhead`` or ``max-autotune`` on a GPU): then every step must tell torch where it
    begins (``SwAVEngine(cuda_graphs=True)``)."""
    return (cfg.model.compile and device.type == "cuda"
            and cfg.model.compile_mode in CUDA_GRAPH_MODES)


def use_cudnn_benchmark(cfg: ExperimentConfig, device: torch.device) -> bool:
    """``model.cudnn_benchmark`` for this process when it trains on a GPU (a process-wide
    switch: every model of the process runs under it). Returns the setting in force."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.model.cudnn_benchmark
    return torch.backends.cudnn.benchmark


def build_engine(cfg: ExperimentConfig, steps_per_epoch: int, device: torch.device,
                 batch_size: int, wrap: Callable[[nn.Module], nn.Module] | None = None,
                 amp: bool = True, start: dict[str, torch.Tensor] | None = None) -> SwAVEngine:
    """Model (seeded, channels-last and SyncBatchNorm on GPU, then ``wrap``: e.g. Ray's DDP
    ``prepare_model``; default: moved to ``device``), loss, optimiser, schedule and engine
    (``amp``: bf16 autocast on GPU). A compiled model (``model.compile``) is compiled here, for
    steps of ``batch_size`` images, not in the first training step. ``start``: the backbone's
    starting weights (``model.init``)."""
    model = initial_model(cfg, start)
    channels_last = cfg.model.channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = convert_sync_batchnorm(model, device)
    compiled = compile_model(model, cfg, device)
    use_cudnn_benchmark(cfg, device)
    model = wrap(model) if wrap is not None else model.to(device)
    optimizer, scheduler = build_optimization(cfg, model, steps_per_epoch)
    s = cfg.swav
    engine = SwAVEngine(model, build_loss(cfg), optimizer, scheduler, device=device,
                        batch_size=batch_size, queue_length=s.queue_length,
                        epoch_queue_starts=s.epoch_queue_starts,
                        freeze_prototypes_iters=s.freeze_prototypes_iters, amp=amp,
                        channels_last=channels_last,
                        cuda_graphs=replays_cuda_graphs(cfg, device))
    if compiled:  # (under DDP every worker builds its engine, so every worker warms up)
        engine.warm_up(warm_up_crops(cfg, batch_size, device))
    return engine


# -- a whole training setup -------------------------------------------------------------------

@dataclass
class Training:
    """What one process of a run trains with; :meth:`run_epoch` is the one epoch loop."""

    cfg: Any
    rank: int
    engine: SwAVEngine
    loader: DataLoader | ResidentBatches
    evaluation: tuple[KeptBatches, KeptBatches, int] | None  # bank, held-out, classes (own shards)
    augment: BatchMultiCrop | None = None  # crops made on the device from uint8 batches

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    def run_epoch(self, epoch: int, on_step: Callable[[int, torch.Tensor], None] | None = None
                  ) -> EpochStats:
        # The shuffling order and the crops are a function of (seed, rank, epoch): identical
        # after a resume.
        seed = (self.cfg.scaling.seed + self.rank) * 100_003 + epoch
        self.loader.generator.manual_seed(seed)
        batches: Any = self.loader
        if self.augment is not None:
            self.augment.reseed(seed)
            batches = (self._crops(raw) for raw in self.loader)
        return self.engine.train_epoch(batches, epoch, on_step=on_step)

    def _crops(self, raw: RawBatch) -> Batch:
        device = self.engine.device
        images = raw.images.to(device, non_blocking=True)
        sizes = None if raw.sizes is None else raw.sizes.to(device, non_blocking=True)
        return Batch(self.augment(images, sizes), raw.labels, raw.corrupt)  # type: ignore[misc]


def build_training(cfg: ExperimentConfig, rank: int = 0, world: int = 1,
                   device: torch.device | str = "cpu",
                   wrap: Callable[[nn.Module], nn.Module] | None = None,
                   start: dict[str, torch.Tensor] | None = None) -> Training:
    """Everything process ``rank`` of ``world`` needs to train ``cfg`` (``world=1``: the whole
    global batch in one process; ``start``: the backbone's starting weights)."""
    device = torch.device(device)
    seed = cfg.scaling.seed
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    splits = open_splits(cfg)
    loader = train_loader(cfg, splits, rank, world, device)
    batch = per_process_batch(cfg, world)
    engine = build_engine(cfg, len(loader), device, batch, wrap, start=start)
    sets = eval_sets(cfg, splits)
    evaluation = None
    if sets is not None:
        # The same images every kNN pass, through a transform without randomness: kept.
        bank, held = eval_loaders(cfg, sets, rank, world)
        evaluation = (KeptBatches(bank), KeptBatches(held), sets.n_classes)
    raw = isinstance(loader, ResidentBatches) or loader.collate_fn is collate_uint8
    augment = batch_crop_transform(cfg, device) if raw else None  # uint8 in, crops made here
    if augment is not None:  # crops.compile: compiled now (what it compiles sees the crops'
        side = max(cfg.crops.size_crops)  # shapes alone, not the images')
        augment.warm_up((batch, 3, side, side), device)
    return Training(cfg, rank, engine, loader, evaluation, augment)


def warm_up_crops(cfg: ExperimentConfig, batch_size: int, device: torch.device
                  ) -> list[torch.Tensor]:
    """Zero crops of a training step's shapes: one group per resolution."""
    return [torch.zeros(n * batch_size, 3, s, s, device=device)
            for n, s in zip(cfg.crops.nmb_crops, cfg.crops.size_crops)]
