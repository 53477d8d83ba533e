"""Evaluation of frozen SwAV representations.

* Weighted cosine kNN as in Wu et al. (2018) and the usual SSL protocol (k=200, temperature 0.07):
  every one of the ``k`` nearest training features votes for its label with weight
  ``exp(cosine / temperature)`` (:func:`knn_predict`, :func:`knn_accuracy`).
* Linear evaluation on frozen, cached features (:func:`linear_eval`): the SwAV linear protocol
  (Caron et al., 2020, Appendix; official ``eval_linear.py``: one linear layer, SGD with Nesterov
  momentum 0.9, lr 0.3 for batch 256, weight decay 1e-6, cosine schedule to 0 over 100 epochs),
  or, for small data, an L-BFGS multinomial logistic regression as in CLIP's linear probes
  (Radford et al., 2021).
* Quality of the prototype assignments against labels (:func:`assign_with_scores`,
  :func:`cluster_quality`):
  NMI and ARI as in DeepCluster (Caron et al., 2018) and SeLa (Asano et al., 2020), purity,
  prototype usage and the entropy of the assignment distribution (collapse diagnostics).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LINEAR_METHODS",
    "assign_with_scores",
    "cluster_quality",
    "extract_features",
    "knn_accuracy",
    "knn_predict",
    "linear_eval",
]

#: What :func:`linear_eval` accepts as ``method``.
LINEAR_METHODS = ("auto", "sklearn", "sgd")

#: ``linear_eval(method="auto")`` uses scikit-learn up to this many training samples, SGD above.
SKLEARN_MAX_TRAIN = 20_000


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


# -- input checks ----------------------------------------------------------------------------

def _check_features(name: str, features: torch.Tensor) -> None:
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[0] == 0:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)
        raise ValueError(f"{name}: expected a non-empty [N, D] tensor, got {shape}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{name}: contains NaN or infinite values")


def _check_labels(name: str, labels: torch.Tensor, n: int) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != n:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels)
        raise ValueError(f"{name}: expected a [{n}] tensor, got {shape}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dtype.is_complex:
        raise ValueError(f"{name}: expected integer labels, got {labels.dtype}")
    if n and int(labels.min()) < 0:
        raise ValueError(f"{name}: labels must be >= 0, got {int(labels.min())}")


def _check_split(train_features: torch.Tensor, train_labels: torch.Tensor,
                 test_features: torch.Tensor, test_labels: torch.Tensor) -> None:
    _check_features("train_features", train_features)
    _check_features("test_features", test_features)
    if test_features.shape[1] != train_features.shape[1]:
        raise ValueError(f"test_features: dimension {test_features.shape[1]} differs from "
                         f"train_features' {train_features.shape[1]}")
    _check_labels("train_labels", train_labels, train_features.shape[0])
    _check_labels("test_labels", test_labels, test_features.shape[0])


def _resolve_n_classes(n_classes: int | None, *labels: torch.Tensor) -> int:
    seen = max(int(lb.max()) for lb in labels) + 1
    if n_classes is None:
        return seen
    if n_classes < seen:
        raise ValueError(f"n_classes: {n_classes} is below the largest label + 1 ({seen})")
    return n_classes


def _topk_accuracies(scores: torch.Tensor, labels: torch.Tensor, prefix: str) -> dict[str, float]:
    """``{prefix}_top1`` and, with at least 5 classes, ``{prefix}_top5`` of ``scores [Q, C]``."""
    labels = labels.to(scores.device)
    out = {f"{prefix}_top1": float((scores.argmax(1) == labels).float().mean())}
    if scores.shape[1] >= 5:
        top5 = scores.topk(5, dim=1).indices
        out[f"{prefix}_top5"] = float((top5 == labels[:, None]).any(1).float().mean())
    return out


# -- kNN -------------------------------------------------------------------------------------

def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 200,
    temperature: float = 0.07,
    n_classes: int | None = None,
) -> dict[str, float]:
    """Weighted cosine kNN accuracy (Wu et al., 2018): ``{"knn_top1", "knn_top5"}``.

    Features are L2-normalised here (a no-op for :func:`extract_features` output).  ``n_classes``
    defaults to the largest label + 1; ``knn_top5`` is only reported with >= 5 classes.
    """
    _check_split(train_features, train_labels, test_features, test_labels)
    n_classes = _resolve_n_classes(n_classes, train_labels, test_labels)
    device = train_features.device
    scores = knn_predict(F.normalize(train_features.float(), dim=1), train_labels.long().to(device),
                         F.normalize(test_features.float().to(device), dim=1), n_classes, k,
                         temperature)
    return _topk_accuracies(scores, test_labels.long(), "knn")


# -- linear evaluation -----------------------------------------------------------------------

def _prepare_linear_inputs(train: torch.Tensor,
                           test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalise, then standardise every dimension with the training mean/std.

    The standardisation is a parameter-free BatchNorm with frozen training statistics (as the
    ``BatchNorm1d(affine=False)`` of MAE's linear probe): it makes one learning rate / ``C``
    suitable whatever the scale of the features, and is a fixed affine map, so the classifier
    stays linear in the features.
    """
    train = F.normalize(train.float(), dim=1)
    test = F.normalize(test.float().to(train.device), dim=1)
    mean, std = train.mean(0), train.std(0, unbiased=False)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return (train - mean) / std, (test - mean) / std


def _linear_sgd(train: torch.Tensor, labels: torch.Tensor, test: torch.Tensor, n_classes: int,
                epochs: int, lr: float, batch_size: int, weight_decay: float,
                seed: int) -> torch.Tensor:
    """SwAV ``eval_linear.py`` on cached features; returns the test logits ``[Q, n_classes]``."""
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(train.shape[1], n_classes).to(train.device)
    with torch.no_grad():  # official RegLog initialisation
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
        head.bias.zero_()
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, nesterov=True,
                                weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0.0)
    for _ in range(epochs):
        order = torch.randperm(train.shape[0], generator=generator).to(train.device)
        for batch in order.split(batch_size):
            loss = F.cross_entropy(head(train[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
    with torch.no_grad():
        return head(test)


def _linear_sklearn(train: torch.Tensor, labels: torch.Tensor, test: torch.Tensor,
                    n_classes: int, C: float, max_iter: int) -> torch.Tensor:
    """L-BFGS multinomial logistic regression; returns test class probabilities ``[Q, C]``
    (classes absent from the training labels get probability 0)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    y = labels.cpu().numpy()
    if np.unique(y).size < 2:
        raise ValueError("train_labels: the sklearn method needs at least 2 distinct classes")
    clf = LogisticRegression(C=C, max_iter=max_iter)
    with warnings.catch_warnings():  # not converging at max_iter is the documented cap
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(train.cpu().numpy(), y)
    proba = torch.zeros(test.shape[0], n_classes, dtype=torch.float64)
    proba[:, torch.as_tensor(clf.classes_)] = torch.from_numpy(
        clf.predict_proba(test.cpu().numpy())).double()
    return proba


def _check_linear_args(method: str, epochs: int, lr: float, batch_size: int,
                       weight_decay: float, C: float, max_iter: int) -> None:
    if method not in LINEAR_METHODS:
        raise ValueError(f"method: expected one of {LINEAR_METHODS}, got {method!r}")
    checks = [("epochs", epochs, epochs >= 1), ("lr", lr, lr > 0),
              ("batch_size", batch_size, batch_size >= 1),
              ("weight_decay", weight_decay, weight_decay >= 0), ("C", C, C > 0),
              ("max_iter", max_iter, max_iter >= 1)]
    for name, value, ok in checks:
        if not ok:
            raise ValueError(f"{name}: out of range, got {value}")


def linear_eval(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    method: str = "auto",
    epochs: int = 100,
    lr: float = 0.3,
    batch_size: int = 256,
    weight_decay: float = 1e-6,
    seed: int = 0,
    C: float = 1.0,
    max_iter: int = 1000,
    n_classes: int | None = None,
) -> dict[str, float]:
    """Linear classifier on frozen features: ``{"linear_top1", "linear_top5"}``.

    Features are L2-normalised and then standardised with the training mean/std (see
    :func:`_prepare_linear_inputs`) for both methods.

    * ``"sgd"``: the SwAV linear protocol (official ``eval_linear.py``) on cached features, without
      augmentation: ``nn.Linear(D, n_classes)`` initialised N(0, 0.01), cross-entropy, mini-batches
      of ``batch_size`` reshuffled every epoch, SGD momentum 0.9 with Nesterov, ``weight_decay``,
      ``lr`` annealed to 0 by a per-epoch cosine schedule over ``epochs``.  Seeded by ``seed``;
      runs on the features' device.
    * ``"sklearn"``: ``LogisticRegression(C=C, max_iter=max_iter)`` (L-BFGS, multinomial), as in
      CLIP's linear probes; deterministic, fast for small data.
    * ``"auto"``: ``"sklearn"`` up to ``SKLEARN_MAX_TRAIN`` (20,000) training samples, else
      ``"sgd"``.

    ``n_classes`` defaults to the largest label + 1; ``linear_top5`` only with >= 5 classes.
    """
    _check_split(train_features, train_labels, test_features, test_labels)
    _check_linear_args(method, epochs, lr, batch_size, weight_decay, C, max_iter)
    n_classes = _resolve_n_classes(n_classes, train_labels, test_labels)
    if method == "auto":
        method = "sklearn" if train_features.shape[0] <= SKLEARN_MAX_TRAIN else "sgd"
    train, test = _prepare_linear_inputs(train_features, test_features)
    labels = train_labels.long().to(train.device)
    if method == "sgd":
        with torch.enable_grad():
            scores = _linear_sgd(train, labels, test, n_classes, epochs, lr, batch_size,
                                 weight_decay, seed)
    else:
        scores = _linear_sklearn(train, labels, test, n_classes, C, max_iter)
    return _topk_accuracies(scores, test_labels.long(), "linear")


# -- prototype assignments -------------------------------------------------------------------

def _images_and_labels(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    images, labels = (batch.crops, batch.labels) if hasattr(batch, "crops") else batch
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError("loader: batches must hold one [B, C, H, W] image tensor "
                         "(use swav.data.collate_eval, not the multi-crop collate)")
    return images, labels


@torch.no_grad()
def assign_with_scores(
    model: nn.Module, loader: Iterable, device: torch.device | str = "cpu", head: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Hard prototype assignment of every image: ``(assignments [N] long, scores [N], labels)``.

    ``scores`` is the winning prototype's score ``z . c_k`` (a cosine: ``z`` and the prototypes are
    unit vectors), computed in eval mode as
    ``model.prototypes.heads[head](model.projection_head(model.backbone(x)))``.  ``labels`` is None
    when the data has none.  The model's training mode is restored afterwards.
    """
    n_heads = len(model.prototypes.heads)
    if not 0 <= head < n_heads:
        raise ValueError(f"head: must be in [0, {n_heads}), got {head}")
    was_training = model.training
    model.eval()
    best, winners, labels, labelled = [], [], [], True
    try:
        for batch in loader:
            images, y = _images_and_labels(batch)
            z = model.projection_head(model.backbone(images.to(device)))
            score, index = model.prototypes.heads[head](z).float().max(dim=1)
            best.append(score.cpu())
            winners.append(index.cpu())
            labelled = labelled and y is not None
            if y is not None:
                labels.append(torch.as_tensor(y))
    finally:
        model.train(was_training)
    if not winners:
        raise ValueError("loader: no images to assign")
    return torch.cat(winners), torch.cat(best), (torch.cat(labels) if labelled else None)


def _check_assignments(assignments: torch.Tensor, labels: torch.Tensor,
                       n_prototypes: int) -> None:
    if not isinstance(n_prototypes, int) or n_prototypes < 1:
        raise ValueError(f"n_prototypes: must be an int >= 1, got {n_prototypes}")
    if not isinstance(assignments, torch.Tensor) or assignments.dim() != 1 \
            or assignments.shape[0] == 0:
        raise ValueError("assignments: expected a non-empty 1-D tensor")
    if assignments.dtype.is_floating_point or assignments.dtype == torch.bool:
        raise ValueError(f"assignments: expected integers, got {assignments.dtype}")
    low, high = int(assignments.min()), int(assignments.max())
    if low < 0 or high >= n_prototypes:
        raise ValueError(f"assignments: values must be in [0, {n_prototypes}), "
                         f"got [{low}, {high}]")
    _check_labels("labels", labels, assignments.shape[0])


def majority_labels(assignments: torch.Tensor, labels: torch.Tensor,
                    n_prototypes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prototype's most frequent label among the images assigned to it ``[K]`` (-1 where it
    holds none; a tie goes to the smaller label) and that label's share of its images ``[K]``
    (float64, 0 where it holds none)."""
    _check_assignments(assignments, labels, n_prototypes)
    a, y = assignments.long().cpu(), labels.long().cpu()
    n_labels = int(y.max()) + 1
    table = torch.bincount(a * n_labels + y, minlength=n_prototypes * n_labels)
    table = table.view(n_prototypes, n_labels)
    sizes = table.sum(1)
    majority = table.argmax(1)  # the first of equal counts: the smaller label
    share = table.gather(1, majority[:, None]).squeeze(1).double() / sizes.clamp_min(1)
    return majority.masked_fill(sizes == 0, -1), share


def cluster_quality(
    assignments: torch.Tensor, labels: torch.Tensor, n_prototypes: int
) -> dict[str, float | int]:
    """Agreement of hard prototype assignments with ground-truth labels.

    * ``nmi``: normalised mutual information (arithmetic normalisation), ``ari``: adjusted Rand
      index, both from :mod:`sklearn.metrics` (the DeepCluster / SeLa cluster metrics);
    * ``purity``: ``sum over prototypes of the count of its majority label / N``;
    * ``prototypes_used``: prototypes with at least one sample (collapse diagnostic);
    * ``code_entropy``: entropy in nats of the empirical assignment distribution
      (``log(n_prototypes)`` at most, for perfectly equipartitioned assignments).
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    _check_assignments(assignments, labels, n_prototypes)
    a = assignments.long().cpu()
    _, y = torch.unique(labels.long().cpu(), return_inverse=True)
    n_labels = int(y.max()) + 1
    table = torch.bincount(a * n_labels + y, minlength=n_prototypes * n_labels)
    table = table.view(n_prototypes, n_labels)
    sizes = table.sum(1)
    p = sizes[sizes > 0].double() / a.shape[0]
    a_np, y_np = a.numpy(), y.numpy()
    return {
        "nmi": float(normalized_mutual_info_score(y_np, a_np, average_method="arithmetic")),
        "ari": float(adjusted_rand_score(y_np, a_np)),
        "purity": float(table.max(1).values.sum()) / a.shape[0],
        "prototypes_used": int((sizes > 0).sum()),
        "code_entropy": float(-(p * p.log()).sum()),
    }
