"""Evaluation batches kept after the first pass (swav/kept_batches.py)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from swav.data import Batch, collate_eval
from swav.kept_batches import KeptBatches


class Counting(Dataset):
    def __init__(self, n: int) -> None:
        self.n, self.reads = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.reads += 1
        return torch.full((3, 4, 4), float(i)), i % 3


def _loader(data: Counting) -> DataLoader:
    return DataLoader(data, batch_size=4, collate_fn=collate_eval)


def _rows(batches) -> list[tuple[float, int]]:
    return [(float(img[0, 0, 0]), int(y)) for b in batches for img, y in zip(b.crops, b.labels)]


def test_later_passes_replay_the_first_without_reading_the_data():
    data = Counting(10)
    kept = KeptBatches(_loader(data))
    first = _rows(kept)
    assert data.reads == 10 and len(kept) == 3
    assert _rows(kept) == _rows(kept) == first == [(float(i), i % 3) for i in range(10)]
    assert data.reads == 10  # nothing read again
    assert all(isinstance(b, Batch) for b in kept)


def test_batches_past_the_bound_stream_every_pass():
    data = Counting(10)
    per_batch = 4 * 3 * 4 * 4 * 4 + 4 * 8  # 4 float images of 3x4x4 and 4 int64 labels
    kept = KeptBatches(_loader(data), max_bytes=2 * per_batch)  # 2 of the 3 batches fit
    assert _rows(kept) == _rows(kept) == [(float(i), i % 3) for i in range(10)]
    assert data.reads == 20 and kept.kept is None and kept.streaming


def test_a_pass_left_half_way_keeps_nothing():
    data = Counting(10)
    kept = KeptBatches(_loader(data))
    next(iter(kept))
    assert kept.kept is None and data.reads == 4
    assert _rows(kept) == _rows(kept) == [(float(i), i % 3) for i in range(10)]
    assert data.reads == 4 + 10  # the first whole pass is kept
