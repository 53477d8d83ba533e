"""Evaluation batches kept after their first pass.

The per-epoch kNN evaluation embeds the same bank and held-out images every epoch through a
transform without randomness (decode, resize, normalise), so its batches are the same each time.
:class:`KeptBatches` keeps them in memory after the first pass when they fit, and the later passes
skip the loader's decoding and transforms.  Past the bound it keeps nothing and streams, as a
plain loader does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["KEEP_BYTES", "KeptBatches"]

KEEP_BYTES = 1 << 30  # per process: CIFAR-10 at 32 px (bank and held-out, one worker) is 0.74 GiB


class KeptBatches:
    """``loader``'s batches (``(images, labels)`` or :class:`swav.data.Batch`), read once and then
    replayed, when their tensors take at most ``max_bytes``."""

    def __init__(self, loader: Iterable, max_bytes: int = KEEP_BYTES) -> None:
        self.loader, self.max_bytes = loader, max_bytes
        self.kept: list[Any] | None = None
        self.streaming = False  # the batches did not fit: never kept

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        if self.kept is not None:
            yield from self.kept
            return
        kept: list[Any] = []
        size = 0
        for batch in self.loader:
            if not self.streaming:
                size += _nbytes(batch)
                if size <= self.max_bytes:
                    kept.append(batch)
                else:
                    self.streaming, kept = True, []
            yield batch
        if not self.streaming:
            self.kept = kept  # a complete pass only (a pass left half-way keeps nothing)


def _nbytes(batch: Any) -> int:
    parts = (batch.crops, batch.labels) if hasattr(batch, "crops") else batch
    total = 0
    for part in parts:
        if isinstance(part, torch.Tensor):
            total += part.numel() * part.element_size()
        elif isinstance(part, (list, tuple)):
            total += sum(p.numel() * p.element_size() for p in part)
    return total
