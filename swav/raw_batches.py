"""Training images as uint8 batches for multi-crop on the training device.

When the crops are made on the device (:class:`swav.batch_multicrop.BatchMultiCrop`), the data
path only has to deliver undecoded-free ``uint8`` pixels:

* :func:`resident_images` decodes a small data set (CIFAR, the digits, a Parquet file that fits)
  once, into one ``uint8 [N, 3, H, W]`` tensor that :class:`ResidentBatches` keeps on the device
  and batches by a seeded permutation: no loader processes, no host-to-device copy per step;
* otherwise loader workers decode to ``uint8`` (:func:`to_uint8`) and :func:`collate_uint8`
  pads images of different sizes to one shape (edge-replicated), with each image's ``(h, w)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from swav.data import Transformed

__all__ = ["RawBatch", "ResidentBatches", "collate_uint8", "fits_in_memory", "resident_images",
           "to_uint8"]

log = logging.getLogger(__name__)
MAX_RESIDENT_BYTES = 4 * 2**30  # a shard larger than this is streamed by loader workers
DECODE_BATCH = 512


@dataclass
class RawBatch:
    """uint8 images ``[B, 3, H, W]``, their valid sizes ``[B, 2]`` (None: all full), labels."""

    images: torch.Tensor
    sizes: torch.Tensor | None
    labels: torch.Tensor | None
    corrupt: int = 0


def to_uint8(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a ``uint8 [3, H, W]`` tensor (what loader workers do on this path)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def collate_uint8(samples: list) -> RawBatch:
    """Drop undecodable samples (refilled by repeats, as for the PIL path); pad to one shape."""
    good = [s for s in samples if s is not None]
    corrupt = len(samples) - len(good)
    if not good:
        raise RuntimeError(f"all {len(samples)} images of a batch failed to decode")
    good += [good[i % len(good)] for i in range(corrupt)]
    shapes = torch.tensor([list(img.shape[1:]) for img, _ in good])
    height, width = (int(v) for v in shapes.max(dim=0).values)
    images = torch.zeros(len(good), 3, height, width, dtype=torch.uint8)
    for i, (img, _) in enumerate(good):
        h, w = img.shape[1], img.shape[2]
        images[i, :, :h, :w] = img
        # Edge-replicated padding: bilinear sampling at a crop's border reads up to half a pixel
        # beyond it, which must see the image's own edge (as on an unpadded image), not zeros.
        images[i, :, :h, w:] = img[:, :, w - 1:]
        images[i, :, h:, :] = images[i, :, h - 1:h, :]
    same = bool((shapes == shapes[0]).all())
    labels = [label for _, label in good]
    label_tensor = None if any(v is None for v in labels) else torch.tensor(labels)
    return RawBatch(images, None if same else shapes, label_tensor, corrupt)


def fits_in_memory(count: int, image: torch.Tensor, max_bytes: int = MAX_RESIDENT_BYTES) -> bool:
    """Whether ``count`` uint8 images the size of ``image`` stay within ``max_bytes``: the bound
    under which a shard is kept resident (:func:`resident_images`)."""
    return count * image.numel() <= max_bytes


def resident_images(dataset: Dataset, workers: int = 0,
                    max_bytes: int = MAX_RESIDENT_BYTES) -> tuple[torch.Tensor, int] | None:
    """All images of ``dataset`` as one ``uint8 [N, 3, H, W]`` tensor and the number of
    undecodable images left out; None when the images differ in size or would exceed
    ``max_bytes`` (then they are streamed)."""
    n = len(dataset)  # type: ignore[arg-type]
    first = next((s for s in (Transformed(dataset, to_uint8)[i] for i in range(min(n, 8)))
                  if s is not None), None)
    if first is None or not fits_in_memory(n, first[0], max_bytes):
        return None
    shape = first[0].shape
    loader = DataLoader(Transformed(dataset, to_uint8), batch_size=DECODE_BATCH,
                        num_workers=workers, collate_fn=list)
    parts, corrupt = [], 0
    for samples in loader:
        good = [s[0] for s in samples if s is not None]
        corrupt += len(samples) - len(good)
        if any(img.shape != shape for img in good):
            return None
        if good:
            parts.append(torch.stack(good))
    if corrupt:
        log.warning("left out %d undecodable images of %d", corrupt, n)
    return torch.cat(parts), corrupt


class ResidentBatches:
    """Batches of a resident uint8 image tensor in a seeded random order, last partial dropped.

    ``generator`` is a CPU generator like a ``DataLoader``'s (the epoch loop reseeds it); the
    first batch of every epoch carries the count of images that could not be decoded
    (``dropped``). Their places are refilled by repeats of decoded images, as the loader path
    refills a batch: every worker's shard has the same rows, so every worker takes the same
    number of steps whatever it failed to decode (one step fewer would hang the others' DDP).
    """

    def __init__(self, images: torch.Tensor, batch_size: int, device: torch.device,
                 seed: int = 0, dropped: int = 0) -> None:
        if len(images) + dropped < batch_size:
            raise ValueError(f"optim.batch_size: {batch_size} images per step exceed the "
                             f"{len(images) + dropped} images of each worker's shard")
        if len(images) == 0:
            raise ValueError(f"data: none of the {dropped} images of a worker's shard decode")
        self.images = images.to(device)
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.dropped = dropped  # undecodable images left out: counted in every epoch's figures

    def __len__(self) -> int:
        return (len(self.images) + self.dropped) // self.batch_size

    def __iter__(self) -> Iterator[RawBatch]:
        n = len(self.images)
        order = torch.randperm(n, generator=self.generator)
        if self.dropped:  # the shard's full length: repeats, in the same random order
            order = order.repeat(self.dropped // n + 2)[:n + self.dropped]
        order = order.to(self.images.device)
        for step in range(len(self)):
            rows = order[step * self.batch_size: (step + 1) * self.batch_size]
            yield RawBatch(self.images.index_select(0, rows), None, None,
                           self.dropped if step == 0 else 0)
