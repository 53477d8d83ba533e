"""Tests for swav.raw_batches: uint8 images for multi-crop on the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from swav.data import ArrayImageDataset
from swav.raw_batches import (
    ResidentBatches,
    collate_uint8,
    resident_images,
    to_uint8,
)


class Sized(Dataset):
    """RGB images of given (h, w) sizes, pixel value = index; one index may be undecodable."""

    def __init__(self, sizes, broken: int | None = None) -> None:
        self.sizes, self.broken = sizes, broken

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int):
        if i == self.broken:
            raise OSError("truncated file")
        h, w = self.sizes[i]
        return Image.new("RGB", (w, h), (i, i, i)), i % 3


def test_to_uint8_is_chw_uint8_of_the_rgb_pixels():
    img = Image.fromarray(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3))
    out = to_uint8(img)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 2, 3)
    assert out[:, 1, 2].tolist() == [15, 16, 17]


def test_collate_pads_by_edge_replication_and_reports_sizes():
    a = torch.arange(6, dtype=torch.uint8).view(1, 2, 3).expand(3, -1, -1)
    b = torch.full((3, 3, 2), 9, dtype=torch.uint8)
    batch = collate_uint8([(a, 0), (b, 1)])
    assert tuple(batch.images.shape) == (2, 3, 3, 3)
    assert batch.sizes.tolist() == [[2, 3], [3, 2]]
    assert batch.images[0, 0].tolist() == [[0, 1, 2], [3, 4, 5], [3, 4, 5]]  # last row repeated
    assert batch.images[1, 0].tolist() == [[9, 9, 9]] * 3
    assert batch.labels.tolist() == [0, 1] and batch.corrupt == 0


def test_collate_same_sizes_need_no_sizes_and_refills_corrupt_samples():
    img = torch.zeros(3, 4, 4, dtype=torch.uint8)
    batch = collate_uint8([(img, 1), None, (img + 1, None)])
    assert batch.sizes is None and batch.corrupt == 1 and len(batch.images) == 3
    assert batch.labels is None  # one sample has no label
    with pytest.raises(RuntimeError, match="all 2 images of a batch failed"):
        collate_uint8([None, None])


def test_resident_images_decode_once_skip_undecodable_and_refuse_what_does_not_fit():
    images, labels = np.random.default_rng(0).integers(0, 255, (10, 8, 8), np.uint8), None
    tensor, dropped = resident_images(ArrayImageDataset(images, labels))
    assert tensor.dtype == torch.uint8 and tuple(tensor.shape) == (10, 3, 8, 8)
    assert torch.equal(tensor[:, 0], torch.from_numpy(images)) and dropped == 0
    tensor, dropped = resident_images(Sized([(4, 4)] * 5, broken=2))
    assert dropped == 1 and tensor[:, 0, 0, 0].tolist() == [0, 1, 3, 4]
    assert resident_images(Sized([(4, 4), (4, 5)])) is None  # sizes differ: streamed instead
    assert resident_images(Sized([(4, 4)] * 5), max_bytes=200) is None  # 5 x 48 bytes


def test_resident_batches_are_a_seeded_permutation_per_epoch():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2)
    batches = ResidentBatches(images, 4, torch.device("cpu"), seed=5)
    assert len(batches) == 2  # the partial batch is dropped
    assert len(set(torch.cat([b.images[:, 0, 0, 0] for b in batches]).tolist())) == 8
    # A shard of 12 rows of which 2 did not decode takes as many steps as a whole one of 12
    # (the other workers' DDP waits on every step): the 2 places are refilled by repeats.
    batches = ResidentBatches(images, 3, torch.device("cpu"), seed=5, dropped=2)
    assert len(batches) == len(ResidentBatches(torch.cat([images, images[:2]]), 3,
                                               torch.device("cpu"))) == 4
    epoch = list(batches)
    seen = torch.cat([b.images[:, 0, 0, 0] for b in epoch])
    assert len(seen) == 12 and set(seen.tolist()) == set(range(10))  # all 10, 2 of them twice
    assert [b.corrupt for b in epoch] == [2, 0, 0, 0]  # left-out images counted once per epoch
    batches.generator.manual_seed(5)
    again = torch.cat([b.images[:, 0, 0, 0] for b in batches])
    assert torch.equal(seen, again)
    assert not torch.equal(seen, torch.cat([b.images[:, 0, 0, 0] for b in batches]))
    with pytest.raises(ValueError, match="optim.batch_size: 11 images per step exceed"):
        ResidentBatches(images, 11, torch.device("cpu"))
