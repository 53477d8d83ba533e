"""The peer of ``swav.batch_multicrop`` for ``bench/bench_pipeline.py``: SwAV multi-crop built from
Kornia's batched augmentations (``kornia.augmentation``), per-image random parameters.

Issue 9 asked for batched GPU multi-crop "or Kornia if it is as fast"; this is the Kornia
version with the same parameters as :class:`swav.batch_multicrop.BatchMultiCrop`:
``RandomResizedCrop`` (scale per resolution group, ratio 3/4..4/3), horizontal flip, colour
jitter (0.8s, 0.8s, 0.8s, 0.2s with probability ``color_prob``), grayscale, Gaussian blur (the
kernel of :func:`swav.multicrop.blur_kernel_size`, sigma 0.1..2, probability ``blur_prob``),
``Normalize`` (swav-ray fixes the colour and grayscale probabilities at 0.8 and 0.2).  Kornia
draws every parameter per image (``same_on_batch=False``) except the order of the colour-jitter
operations, which it draws once per call; ours draws it per crop.

Kornia is in the ``bench`` extra, not a dependency of swav-ray (``pip install
'swav-ray[bench]'``; on a GPU machine, the wheels ``bench/prepare_device.sh`` puts in ``.gpu/``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from swav.multicrop import IMAGENET_MEAN, IMAGENET_STD, blur_kernel_size

CROP_MODES = ("resample", "slice")


class KorniaMultiCrop:
    """Crops of a uint8 batch ``[B, 3, H, W]``, one float tensor per resolution group, crop-major
    (the layout of :class:`swav.batch_multicrop.BatchMultiCrop`).

    ``cropping_mode``: Kornia's ``RandomResizedCrop`` mode, ``resample`` (one batched warp,
    bilinear) or ``slice`` (a resize per crop).
    """

    def __init__(self, nmb_crops: Sequence[int], size_crops: Sequence[int],
                 min_scale_crops: Sequence[float], max_scale_crops: Sequence[float],
                 color_strength: float = 1.0, color_prob: float = 0.8,
                 grayscale_prob: float = 0.2, blur_prob: float = 0.5, flip_prob: float = 0.5,
                 cropping_mode: str = "resample",
                 mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        import kornia.augmentation as K  # optional: only this bench row needs it

        if cropping_mode not in CROP_MODES:
            raise ValueError(f"cropping_mode: expected one of {CROP_MODES}, got {cropping_mode!r}")
        s = float(color_strength)
        self.groups = []
        for n, size, lo, hi in zip(nmb_crops, size_crops, min_scale_crops, max_scale_crops):
            ops = [K.RandomResizedCrop((size, size), scale=(lo, hi), ratio=(3 / 4, 4 / 3),
                                       cropping_mode=cropping_mode),
                   K.RandomHorizontalFlip(p=flip_prob),
                   K.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, p=color_prob),
                   K.RandomGrayscale(p=grayscale_prob)]
            if blur_prob > 0 and blur_kernel_size(size) > 1:
                kernel = blur_kernel_size(size)
                ops.append(K.RandomGaussianBlur((kernel, kernel), (0.1, 2.0), p=blur_prob))
            ops.append(K.Normalize(mean=torch.tensor(mean), std=torch.tensor(std)))
            self.groups.append((int(n), K.AugmentationSequential(*ops)))

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = images.float().div_(255.0)
        return [augment(x.repeat(n, 1, 1, 1)) for n, augment in self.groups]


def kornia_multicrop(crops, cropping_mode: str = "resample") -> KorniaMultiCrop:
    """The Kornia peer for an experiment's ``crops`` section (``ExperimentConfig.crops``)."""
    return KorniaMultiCrop(crops.nmb_crops, crops.size_crops, crops.min_scale_crops,
                           crops.max_scale_crops, color_strength=crops.color_strength,
                           blur_prob=crops.blur_prob, flip_prob=crops.flip_prob,
                           cropping_mode=cropping_mode, mean=crops.mean, std=crops.std)
