"""``augmentations/multicrop.png``: a few training images and their crops, made as the run makes
them, logged into the run beside the trainer's start.

Drawn on the driver where the data is readable (on a cluster whose workers alone hold it, the
figure is left out); a figure never stops a run.
"""

from __future__ import annotations

import logging
import threading

import torch

from orchestration.config import ExperimentConfig
from orchestration.recipe import (
    batch_crop_transform,
    crop_transform,
    crops_on_device,
    open_splits,
)
from swav.data import SourceSplits, missing_locally
from swav.raw_batches import collate_uint8, fits_in_memory, to_uint8

__all__ = ["crop_examples", "crop_names", "start_crops_figure"]

log = logging.getLogger(__name__)
FIGURE = "augmentations/multicrop.png"


def start_crops_figure(cfg: ExperimentConfig, tracked, splits: SourceSplits | None = None
                       ) -> threading.Thread:
    """:func:`log_crops` in a thread: Ray Train's controller and workers take seconds to start,
    one after the other, and leave a core free meanwhile. Join it before the run ends."""
    thread = threading.Thread(target=log_crops, args=(cfg, tracked, splits),
                              name="crops-figure", daemon=True)
    thread.start()
    return thread


def log_crops(cfg: ExperimentConfig, tracked, splits: SourceSplits | None = None) -> None:
    """Draw the figure and log it into ``tracked`` (a ``TrackedRun``)."""
    d = cfg.data
    if splits is None and missing_locally(d.source, d.path, d.download):
        return
    from swav.viz import multicrop_figure

    try:
        originals, crops = crop_examples(cfg, splits)
        figure = multicrop_figure(originals, crops, crop_names(cfg), cfg.crops.mean,
                                  cfg.crops.std)
        tracked.log_figure(figure, FIGURE)
    except Exception as err:  # a figure never stops a run
        log.warning("%s left out: %s", FIGURE, err)


def crop_names(cfg: ExperimentConfig) -> list[str]:
    """``"global 1 (16 px)"``, ..., ``"local 1 (12 px)"``, ...: one name per crop, in order."""
    names = []
    for group, (count, size) in enumerate(zip(cfg.crops.nmb_crops, cfg.crops.size_crops)):
        kind = "global" if group == 0 else "local"
        start = sum(cfg.crops.nmb_crops[1:group]) if group else 0
        names += [f"{kind} {start + i + 1} ({size} px)" for i in range(count)]
    return names


def crop_examples(cfg: ExperimentConfig, splits: SourceSplits | None = None, n: int = 4,
                  seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The first ``n`` decodable training images (``[n, 3, H, W]`` in [0, 1]; images of other
    sizes are padded as the uint8 batches pad them) and each of their crops (one normalised
    ``[n, 3, s, s]`` tensor per crop, in :func:`crop_names` order), made as the run makes them:
    the PIL transform per image, or (:func:`crops_on_device`) the batched
    :class:`BatchMultiCrop`, here on the CPU (the same code).  The global RNGs are left as they
    were. ``splits``: the data as already opened (else opened here)."""
    train = (splits or open_splits(cfg)).train
    samples = []
    for i in range(len(train)):  # type: ignore[arg-type]
        if len(samples) == n:
            break
        try:
            samples.append(train[i])
        except (OSError, ValueError, SyntaxError):  # a corrupt image: the next one
            continue
    raw = collate_uint8([(to_uint8(image), label) for image, label in samples])
    worker = torch.device("cuda" if cfg.scaling.use_gpu else "cpu")
    # Whether a worker's shard would be kept resident, judged from these images (the workers
    # decide on their whole shard): one size, and the shard's pixels within the bound.
    per_worker = len(train) // cfg.scaling.num_workers  # type: ignore[arg-type]
    resident = raw.sizes is None and fits_in_memory(per_worker, raw.images[0])
    if crops_on_device(cfg, worker, resident):
        groups = batch_crop_transform(cfg, torch.device("cpu"), seed)(raw.images, raw.sizes)
        crops = [crop for group in groups for crop in group.split(len(samples))]  # crop-major
    else:
        transform = crop_transform(cfg)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            views = [transform(image) for image, _ in samples]
        crops = [torch.stack([v[c] for v in views]) for c in range(len(views[0]))]
    return raw.images.float() / 255.0, crops
