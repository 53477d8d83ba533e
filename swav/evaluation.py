"""Evaluation of frozen SwAV representations.

Weighted cosine kNN as in Wu et al. (2018) and the usual SSL protocol (k=200, temperature 0.07):
every one of the ``k`` nearest training features votes for its label with weight
``exp(cosine / temperature)``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["extract_features", "knn_predict"]


@torch.no_grad()
def extract_features(
    encoder: nn.Module, loader: Iterable, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """L2-normalised features of every image of ``loader`` (batches ``(images, labels)`` or
    :class:`swav.data.Batch`) and their labels (None when the data has none)."""
    was_training = encoder.training
    encoder.eval()
    feats, labels, labelled = [], [], True
    for batch in loader:
        images, y = (batch.crops, batch.labels) if hasattr(batch, "crops") else batch
        feats.append(F.normalize(encoder(images.to(device)).float(), dim=1).cpu())
        labelled = labelled and y is not None
        if y is not None:
            labels.append(y)
    encoder.train(was_training)
    if not feats:
        raise ValueError("loader: no images to extract features from")
    return torch.cat(feats), (torch.cat(labels) if labelled else None)


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    n_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores ``[Q, n_classes]`` of weighted cosine kNN (features L2-normalised)."""
    if k < 1:
        raise ValueError(f"knn_k: must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"knn_temperature: must be > 0, got {temperature}")
    k = min(k, train_features.shape[0])
    out = []
    for start in range(0, query_features.shape[0], chunk):
        sim = query_features[start:start + chunk] @ train_features.t()
        weights, idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], n_classes, dtype=sim.dtype, device=sim.device)
        votes.scatter_add_(1, train_labels[idx], (weights / temperature).exp())
        out.append(votes)
    return torch.cat(out)
