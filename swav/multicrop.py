"""SwAV multi-crop augmentation and crop-major batch collation.

Multi-crop (Caron et al., 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments", NeurIPS, Sec. 3.2) takes a few standard-resolution crops plus several small,
low-resolution crops of every image.  Every resolution group ``i`` draws ``nmb_crops[i]`` crops
of ``size_crops[i]`` pixels with ``RandomResizedCrop(scale=(min_scale_crops[i],
max_scale_crops[i]))``; each crop is then augmented as in the paper (and the reference
implementation, facebookresearch/swav ``src/multicropdataset.py``): horizontal flip, colour
distortion (colour jitter + random grayscale), Gaussian blur, ``ToTensor`` and ``Normalize``.
Solarization (Grill et al., 2020, BYOL, Appendix B: pixels at or above half the range inverted)
is not part of SwAV's augmentation; ``solarize_prob`` adds it after the blur, as there.

:func:`multicrop_collate` batches the per-image crop lists crop-major: one tensor per resolution
group, in which rows ``B*i ... B*(i+1)-1`` of the concatenation of all groups hold crop ``i`` of
every image (the layout :class:`swav.loss.SwAVLoss` indexes).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

__all__ = ["SOLARIZE_AT", "MultiCropTransform", "blur_kernel_size", "check_multicrop_args",
           "multicrop_collate"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.228, 0.224, 0.225)
SOLARIZE_AT = 128  # uint8 values from here up are inverted (BYOL: 0.5 of the range)


# --------------------------------------------------------------------------- validation helpers


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_lists(
    nmb_crops: Sequence[int],
    size_crops: Sequence[int],
    min_scale_crops: Sequence[float],
    max_scale_crops: Sequence[float],
) -> None:
    if len(nmb_crops) == 0:
        raise ValueError("nmb_crops: must be non-empty")
    others = {
        "size_crops": size_crops,
        "min_scale_crops": min_scale_crops,
        "max_scale_crops": max_scale_crops,
    }
    for name, values in others.items():
        if len(values) != len(nmb_crops):
            raise ValueError(
                f"{name}: has {len(values)} entries but nmb_crops has {len(nmb_crops)}"
            )


def _check_counts_and_sizes(nmb_crops: Sequence[int], size_crops: Sequence[int]) -> None:
    for i, n in enumerate(nmb_crops):
        if not _is_int(n) or n < 1:
            raise ValueError(f"nmb_crops: entry {i} must be an int >= 1, got {n!r}")
    for i, s in enumerate(size_crops):
        if not _is_int(s) or s < 1:
            raise ValueError(f"size_crops: entry {i} must be an int >= 1, got {s!r}")


def _check_scales(min_scale_crops: Sequence[float], max_scale_crops: Sequence[float]) -> None:
    for i, (lo, hi) in enumerate(zip(min_scale_crops, max_scale_crops)):
        if not _is_real(lo) or not 0.0 < lo <= 1.0:
            raise ValueError(f"min_scale_crops: entry {i} must be in (0, 1], got {lo!r}")
        if not _is_real(hi) or not 0.0 < hi <= 1.0:
            raise ValueError(f"max_scale_crops: entry {i} must be in (0, 1], got {hi!r}")
        if lo > hi:
            raise ValueError(
                f"min_scale_crops: entry {i} ({lo}) exceeds max_scale_crops entry ({hi})"
            )


def _check_probability(name: str, p: float) -> None:
    if not _is_real(p) or not 0.0 <= p <= 1.0:  # also rejects NaN
        raise ValueError(f"{name}: must be a probability in [0, 1], got {p!r}")


def _check_mean_std(mean: Sequence[float], std: Sequence[float]) -> None:
    if len(mean) != 3 or not all(_is_real(m) and math.isfinite(m) for m in mean):
        raise ValueError(f"mean: must be 3 finite numbers (one per RGB channel), got {mean!r}")
    if len(std) != 3 or not all(_is_real(s) and math.isfinite(s) and s > 0 for s in std):
        raise ValueError(f"std: must be 3 finite numbers > 0 (one per RGB channel), got {std!r}")


def check_multicrop_args(nmb_crops: Sequence[int], size_crops: Sequence[int],
                         min_scale_crops: Sequence[float], max_scale_crops: Sequence[float],
                         mean: Sequence[float], std: Sequence[float], color_strength: float,
                         **probabilities: float) -> None:
    """Validate the multi-crop settings (shared by the PIL and the batched tensor paths)."""
    _check_lists(nmb_crops, size_crops, min_scale_crops, max_scale_crops)
    _check_counts_and_sizes(nmb_crops, size_crops)
    _check_scales(min_scale_crops, max_scale_crops)
    if not _is_real(color_strength) or not color_strength >= 0.0:
        raise ValueError(f"color_strength: must be >= 0, got {color_strength!r}")
    for name, p in probabilities.items():
        _check_probability(name, p)
    _check_mean_std(mean, std)


# --------------------------------------------------------------------------- augmentation


def blur_kernel_size(size: int) -> int:
    """Odd Gaussian-blur kernel of about 10% of the crop side, at least 3.

    Crops smaller than 3 pixels get a 1-pixel kernel (a no-op): reflect padding cannot pad
    a 1-pixel image by 1, and blurring such a crop is meaningless anyway.
    """
    if size < 3:
        return 1
    k = max(3, int(0.1 * size))
    return k if k % 2 == 1 else k + 1


def _to_pil_rgb(img: Any) -> Image.Image:
    """PIL image (any mode), uint8 CHW tensor or uint8 HxW / HxWxC array -> RGB PIL image."""
    if isinstance(img, Image.Image):
        pil = img
    elif isinstance(img, torch.Tensor):
        if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] not in (1, 3, 4):
            raise TypeError(
                "img: tensors must be uint8 CHW with 1, 3 or 4 channels, "
                f"got dtype {img.dtype} and shape {tuple(img.shape)}"
            )
        pil = TF.to_pil_image(img)
    elif isinstance(img, np.ndarray):
        if img.dtype != np.uint8 or img.ndim not in (2, 3):
            raise TypeError(
                f"img: arrays must be uint8 HxW or HxWxC, got dtype {img.dtype} "
                f"and shape {img.shape}"
            )
        if img.ndim == 3 and img.shape[2] == 1:
            img = img[:, :, 0]
        pil = Image.fromarray(np.ascontiguousarray(img))
    else:
        raise TypeError(f"img: expected a PIL image, tensor or numpy array, got {type(img)}")
    return pil if pil.mode == "RGB" else pil.convert("RGB")


class MultiCropTransform:
    """Turn one image into ``sum(nmb_crops)`` augmented crops, group by group (paper Sec. 3.2).

    Args:
        nmb_crops: number of crops per resolution group (paper: ``[2, 6]``).
        size_crops: output side in pixels per group (paper: ``[224, 96]``).
        min_scale_crops / max_scale_crops: ``RandomResizedCrop`` area-scale range per group
            (paper: ``[0.14, 0.05]`` / ``[1.0, 0.14]``).
        mean / std: per-channel ``Normalize`` statistics (RGB).
        color_strength: ``s`` in ``ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)``.
        color_prob / grayscale_prob / blur_prob / flip_prob / solarize_prob: probabilities of
            colour jitter, grayscale conversion, Gaussian blur, horizontal flip and
            solarization (uint8 values >= 128 become 255 - value), applied per crop.
    """

    def __init__(
        self,
        nmb_crops: Sequence[int],
        size_crops: Sequence[int],
        min_scale_crops: Sequence[float],
        max_scale_crops: Sequence[float],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        color_strength: float = 1.0,
        color_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_prob: float = 0.5,
        flip_prob: float = 0.5,
        solarize_prob: float = 0.0,
    ) -> None:
        check_multicrop_args(nmb_crops, size_crops, min_scale_crops, max_scale_crops, mean, std,
                             color_strength, color_prob=color_prob,
                             grayscale_prob=grayscale_prob, blur_prob=blur_prob,
                             flip_prob=flip_prob, solarize_prob=solarize_prob)
        probs = {"color_prob": color_prob, "grayscale_prob": grayscale_prob,
                 "blur_prob": blur_prob, "flip_prob": flip_prob, "solarize_prob": solarize_prob}

        self._groups = [(int(n), int(s)) for n, s in zip(nmb_crops, size_crops)]
        self._mean = tuple(float(m) for m in mean)
        self._std = tuple(float(s) for s in std)
        self._color_strength = float(color_strength)
        self._probs = {name: float(p) for name, p in probs.items()}
        self._transforms = [
            self._crop_transform(size, (float(lo), float(hi)))
            for (_, size), lo, hi in zip(self._groups, min_scale_crops, max_scale_crops)
        ]

    def _color_distortion(self) -> T.Compose:
        s = self._color_strength
        jitter = T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
        return T.Compose(
            [
                T.RandomApply([jitter], p=self._probs["color_prob"]),
                T.RandomGrayscale(p=self._probs["grayscale_prob"]),
            ]
        )

    def _crop_transform(self, size: int, scale: tuple[float, float]) -> T.Compose:
        blur = T.GaussianBlur(kernel_size=blur_kernel_size(size), sigma=(0.1, 2.0))
        # Solarization only where configured: its draw would move every later crop's otherwise.
        solarize = self._probs["solarize_prob"]
        return T.Compose(
            [
                T.RandomResizedCrop(size, scale=scale),
                T.RandomHorizontalFlip(p=self._probs["flip_prob"]),
                self._color_distortion(),
                T.RandomApply([blur], p=self._probs["blur_prob"]),
                *([T.RandomSolarize(SOLARIZE_AT, p=solarize)] if solarize > 0 else []),
                T.ToTensor(),
                T.Normalize(mean=self._mean, std=self._std),
            ]
        )

    @property
    def n_crops(self) -> int:
        """Total number of crops per image."""
        return sum(n for n, _ in self._groups)

    @property
    def groups(self) -> list[tuple[int, int]]:
        """``(count, size)`` of every resolution group, in output order."""
        return list(self._groups)

    def __call__(self, img: Any) -> list[torch.Tensor]:
        pil = _to_pil_rgb(img)
        crops: list[torch.Tensor] = []
        for (count, _), transform in zip(self._groups, self._transforms):
            crops.extend(transform(pil) for _ in range(count))
        return crops

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(groups={self._groups}, mean={self._mean}, std={self._std}, "
            f"color_strength={self._color_strength}, probs={self._probs})"
        )


# --------------------------------------------------------------------------- collation


def _split_sample(sample: Any) -> tuple[Sequence[torch.Tensor], Any]:
    """A sample is either a list of crop tensors or a ``(crops, label)`` pair."""
    is_pair = (
        isinstance(sample, (tuple, list))
        and len(sample) == 2
        and not isinstance(sample[0], torch.Tensor)
        and isinstance(sample[0], (tuple, list))
    )
    if is_pair:
        return sample[0], sample[1]
    if isinstance(sample, (tuple, list)) and all(isinstance(c, torch.Tensor) for c in sample):
        return sample, None
    raise TypeError(
        "batch: each sample must be a list of crop tensors or a (crops, label) pair, "
        f"got {type(sample)}"
    )


def _label_value(label: Any) -> int | None:
    if _is_int(label):
        return int(label)
    if isinstance(label, torch.Tensor) and label.dim() == 0 and not label.is_floating_point():
        if label.dtype != torch.bool:
            return int(label.item())
    return None


def _group_bounds(shapes: Sequence[torch.Size]) -> list[tuple[int, int]]:
    """``[start, end)`` of every run of consecutive crops with the same shape."""
    bounds: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(shapes) + 1):
        if i == len(shapes) or shapes[i] != shapes[start]:
            bounds.append((start, i))
            start = i
    return bounds


def _check_crops(all_crops: Sequence[Sequence[torch.Tensor]]) -> None:
    n = len(all_crops[0])
    if n == 0:
        raise ValueError("batch: samples have no crops")
    shapes = [c.shape for c in all_crops[0]]
    for b, crops in enumerate(all_crops):
        if len(crops) != n:
            raise ValueError(f"batch: sample {b} has {len(crops)} crops but sample 0 has {n}")
        for i, crop in enumerate(crops):
            if crop.shape != shapes[i]:
                raise ValueError(
                    f"batch: crop {i} of sample {b} has shape {tuple(crop.shape)} "
                    f"but sample 0's has {tuple(shapes[i])}"
                )


def multicrop_collate(batch: Sequence[Any]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Collate multi-crop samples crop-major, one tensor per resolution group.

    Each sample is a list of crop tensors (as returned by :class:`MultiCropTransform`) or a
    ``(crops, label)`` pair.  Consecutive crops of equal shape form a group; the group of crops
    ``j .. j+n-1`` becomes ``torch.cat([stack(crop j over batch), ..., stack(crop j+n-1)])`` of
    shape ``[n*B, C, S, S]``.  Labels are a ``LongTensor [B]`` when every sample has an integer
    label, else ``None``.
    """
    if len(batch) == 0:
        raise ValueError("batch: is empty")
    pairs = [_split_sample(sample) for sample in batch]
    all_crops = [crops for crops, _ in pairs]
    _check_crops(all_crops)

    groups = []
    for start, end in _group_bounds([c.shape for c in all_crops[0]]):
        per_crop = [torch.stack([crops[i] for crops in all_crops]) for i in range(start, end)]
        groups.append(torch.cat(per_crop))

    values = [_label_value(label) for _, label in pairs]
    labels = None
    if all(v is not None for v in values):
        labels = torch.tensor(values, dtype=torch.long)
    return groups, labels
