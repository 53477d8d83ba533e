"""Image data sets for SwAV: in-memory arrays and the embedded default (scikit-learn digits)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["ArrayImageDataset", "load_digits_arrays"]


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits (1,797 8x8 images, 10 classes; ships with the package).

    Returns ``uint8`` images ``[N, 8, 8]`` scaled from 0..16 to 0..255 and ``int64`` labels.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    return images, digits.target.astype(np.int64)


class ArrayImageDataset(Dataset):
    """Images held as a ``uint8`` array (``[N, H, W]`` grey or ``[N, H, W, 3]``) with labels.

    Items are ``(transform(PIL RGB image), label)``; without a transform the PIL image itself.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None = None,
        transform: Callable | None = None,
    ) -> None:
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(
                f"images: expected uint8 [N, H, W] or [N, H, W, 3], got {images.dtype} {images.shape}"
            )
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"labels: {len(labels)} labels for {len(images)} images")
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")

    def __getitem__(self, index: int):
        img = self.image(index)
        sample = self.transform(img) if self.transform is not None else img
        label = None if self.labels is None else int(self.labels[index])
        return sample, label

    def tensors(self, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All images as a float ``[N, 3, H, W]`` tensor in [0, 1] (optionally resized)."""
        x = torch.from_numpy(self.images).float().div_(255.0)
        x = x.unsqueeze(1).expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        if size is not None and x.shape[-1] != size:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                                align_corners=False)
        labels = None if self.labels is None else torch.from_numpy(self.labels)
        return x.contiguous(), labels
