"""Figures for inspecting a SwAV model: prototype member grids, counterfactual panels, embeddings.

* :func:`prototype_grid`: the members of the most populated prototypes, best-scoring first, the
  qualitative cluster inspection of DeepCluster (Caron et al., 2018, Fig. 4) and SwAV's
  prototype visualisations.
* :func:`counterfactual_panel`: an image, its counterfactual (an edit that moves it to another
  prototype) and their signed, amplified difference.
* :func:`embedding_plot`: a 2-D PCA or t-SNE (van der Maaten and Hinton, 2008) map of features,
  coloured by prototype and by label.

Headless-safe without touching the global backend: figures are built with the object-oriented
:class:`matplotlib.figure.Figure` API (no :mod:`matplotlib.pyplot`), which renders through Agg in
``savefig`` whatever backend is selected, so nothing here calls ``matplotlib.use`` (which would
override a notebook's backend) or ``plt.show``, and figures are never registered with pyplot (no
leak when many are made).  Every function returns the :class:`~matplotlib.figure.Figure`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

__all__ = ["counterfactual_panel", "denormalize", "embedding_plot", "prototype_grid"]

_PAD = 1  # pixels of white between the images of a prototype row


# -- input checks and image helpers ----------------------------------------------------------

def _check_images(name: str, images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
        raise ValueError(f"{name}: expected a [N, C, H, W] tensor, got {shape}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"{name}: expected 1 or 3 channels, got {images.shape[1]}")
    if images.shape[0] == 0:
        raise ValueError(f"{name}: no images")


def _check_vector(name: str, values: torch.Tensor, n: int, integer: bool) -> None:
    if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.shape[0] != n:
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values)
        raise ValueError(f"{name}: expected a [{n}] tensor, got {shape}")
    if integer and (values.dtype.is_floating_point or values.dtype == torch.bool):
        raise ValueError(f"{name}: expected integers, got {values.dtype}")


def _check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be an int >= 1, got {value}")


def denormalize(images: torch.Tensor, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> torch.Tensor:
    """``images * std + mean`` per channel, clipped to [0, 1] (as-is when mean/std are None)."""
    images = images.detach().float().cpu()
    channels = images.shape[1]
    for name, stat in (("mean", mean), ("std", std)):
        if stat is not None and len(stat) not in (1, channels):
            raise ValueError(f"{name}: expected 1 or {channels} values, got {len(stat)}")
    if std is not None:
        images = images * torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    if mean is not None:
        images = images + torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    return images.clamp(0.0, 1.0)


def _to_hwc(image: torch.Tensor) -> np.ndarray:
    """``[C, H, W]`` in [0, 1] to an ``imshow`` array (``[H, W]`` for one channel)."""
    array = image.permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def _strip(images: torch.Tensor, slots: int) -> np.ndarray:
    """``images [n, C, H, W]`` side by side in ``slots`` cells separated by white padding."""
    channels, height, width = images.shape[1:]
    canvas = torch.ones(channels, height, slots * (width + _PAD) - _PAD)
    for i, image in enumerate(images):
        start = i * (width + _PAD)
        canvas[:, :, start:start + width] = image
    return _to_hwc(canvas)


def _show(ax, image: np.ndarray, title: str | None = None, **kwargs) -> None:
    if image.ndim == 2 and "cmap" not in kwargs:
        kwargs.update(cmap="gray", vmin=0.0, vmax=1.0)
    ax.imshow(image, interpolation="nearest", **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title, fontsize=8)


# -- prototype member grid -------------------------------------------------------------------

def _top_members(assignments: torch.Tensor, scores: torch.Tensor, n_shown: int,
                 per_prototype: int) -> list[tuple[int, int, torch.Tensor]]:
    """``(prototype, size, member indices best-scoring first)`` of the most populated ones."""
    sizes = torch.bincount(assignments)
    order = sorted(torch.nonzero(sizes).flatten().tolist(), key=lambda k: (-int(sizes[k]), k))
    rows = []
    for k in order[:n_shown]:
        members = torch.nonzero(assignments == k).flatten()
        best = members[scores[members].argsort(descending=True, stable=True)[:per_prototype]]
        rows.append((k, int(sizes[k]), best))
    return rows


def prototype_grid(
    images: torch.Tensor,
    assignments: torch.Tensor,
    scores: torch.Tensor,
    n_prototypes_shown: int = 16,
    per_prototype: int = 8,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Figure:
    """Members of the ``n_prototypes_shown`` most populated prototypes (ties: lower index first).

    One axes per prototype, top to bottom by decreasing size; each shows, in one image strip, its
    ``per_prototype`` members with the highest ``scores`` (e.g. the ``scores`` of
    :func:`swav.evaluation.assign_with_scores`), best first, de-normalised with ``mean``/``std``.
    The row is labelled ``"proto k\\nn=size"``.
    """
    _check_images("images", images)
    n = images.shape[0]
    _check_vector("assignments", assignments, n, integer=True)
    _check_vector("scores", scores, n, integer=False)
    _check_positive_int("n_prototypes_shown", n_prototypes_shown)
    _check_positive_int("per_prototype", per_prototype)
    if int(assignments.min()) < 0:
        raise ValueError(f"assignments: must be >= 0, got {int(assignments.min())}")
    rows = _top_members(assignments.long().cpu(), scores.detach().float().cpu(),
                        n_prototypes_shown, per_prototype)
    pixels = denormalize(images, mean, std)
    height, width = images.shape[2:]
    aspect = per_prototype * (width + _PAD) / height
    fig = Figure(figsize=(min(1.0 + 0.9 * aspect, 20.0), 0.9 * len(rows) + 0.3), dpi=100)
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    for ax, (k, size, members) in zip(axes, rows):
        _show(ax, _strip(pixels[members], per_prototype))
        ax.set_ylabel(f"proto {k}\nn={size}", rotation=0, ha="right", va="center", fontsize=8)
        for side in ax.spines.values():
            side.set_visible(False)
    fig.suptitle(f"{len(rows)} most populated prototypes, top {per_prototype} members by score",
                 fontsize=9)
    return fig


# -- counterfactual panel --------------------------------------------------------------------

def _check_counterfactual_args(original, counterfactual, source, target, prob_source,
                               prob_target, n, amplify) -> None:
    _check_images("original", original)
    if not isinstance(counterfactual, torch.Tensor) or counterfactual.shape != original.shape:
        shape = tuple(counterfactual.shape) if isinstance(counterfactual, torch.Tensor) else None
        raise ValueError(f"counterfactual: expected shape {tuple(original.shape)} like "
                         f"original, got {shape}")
    count = original.shape[0]
    _check_vector("source", source, count, integer=True)
    _check_vector("target", target, count, integer=True)
    _check_vector("prob_source", prob_source, count, integer=False)
    _check_vector("prob_target", prob_target, count, integer=False)
    _check_positive_int("n", n)
    if not amplify > 0:
        raise ValueError(f"amplify: must be > 0, got {amplify}")


def counterfactual_panel(
    original: torch.Tensor,
    counterfactual: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    prob_source: torch.Tensor,
    prob_target: torch.Tensor,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    n: int = 8,
    amplify: float = 5.0,
) -> Figure:
    """One row per image (the first ``n``): original, counterfactual, amplified difference.

    Titles: ``"cluster s, p=0.93"`` (``source``, ``prob_source``) over the original and
    ``"cluster t, p=0.88"`` (``target``, ``prob_target``) over the counterfactual.  The third
    panel is the *signed* difference in de-normalised pixel space, averaged over channels,
    ``amplify * (x_cf - x)`` on the diverging ``RdBu_r`` colormap clipped to [-1, 1] (red: the
    edit brightened the pixel, blue: darkened, white: unchanged): unlike ``|x_cf - x|`` it shows
    the direction of the edit.
    """
    _check_counterfactual_args(original, counterfactual, source, target, prob_source,
                               prob_target, n, amplify)
    rows = min(n, original.shape[0])
    x = denormalize(original[:rows], mean, std)
    x_cf = denormalize(counterfactual[:rows], mean, std)
    diff = (amplify * (x_cf - x)).mean(1).clamp(-1.0, 1.0).numpy()
    fig = Figure(figsize=(5.4, 1.9 * rows), dpi=100)
    axes = fig.subplots(rows, 3, squeeze=False)
    for i in range(rows):
        _show(axes[i, 0], _to_hwc(x[i]),
              f"cluster {int(source[i])}, p={float(prob_source[i]):.2f}")
        _show(axes[i, 1], _to_hwc(x_cf[i]),
              f"cluster {int(target[i])}, p={float(prob_target[i]):.2f}")
        _show(axes[i, 2], diff[i], f"diff x{amplify:g} (red +, blue -)",
              cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    fig.tight_layout()
    return fig


# -- embedding plot --------------------------------------------------------------------------

def _project_2d(features: np.ndarray, method: str, seed: int) -> np.ndarray:
    """PCA (sklearn, exact SVD) or t-SNE (sklearn Barnes-Hut, PCA initialisation) to 2-D.

    t-SNE runs with one OpenMP thread: its OpenMP gradient loop slows down by an order of
    magnitude when the cores are shared (2,000 points on a loaded 2-core machine: 131 s with the
    default threads, 18 s with one; 60 points: 13 s against 0.2 s).
    """
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, svd_solver="full").fit_transform(features)
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    perplexity = min(30.0, (features.shape[0] - 1) / 3.0)
    with threadpool_limits(limits=1):
        return TSNE(n_components=2, perplexity=perplexity, init="pca",
                    random_state=seed).fit_transform(features)


def _scatter(ax, points: np.ndarray, colours: np.ndarray, title: str) -> None:
    distinct = np.unique(colours).size
    cmap = "tab10" if distinct <= 10 else "tab20" if distinct <= 20 else "nipy_spectral"
    ax.scatter(points[:, 0], points[:, 1], c=colours, cmap=cmap, s=6, linewidths=0)
    ax.set_title(f"{title} ({distinct} distinct)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _check_embedding_args(features, assignments, labels, method, max_points) -> None:
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)
        raise ValueError(f"features: expected a [N, D] tensor, got {shape}")
    n, dim = features.shape
    if n < 3 or dim < 2:
        raise ValueError(f"features: need at least 3 points of at least 2 dimensions, "
                         f"got {tuple(features.shape)}")
    _check_vector("assignments", assignments, n, integer=True)
    if labels is not None:
        _check_vector("labels", labels, n, integer=True)
    if method not in ("pca", "tsne"):
        raise ValueError(f"method: expected 'pca' or 'tsne', got {method!r}")
    if not isinstance(max_points, int) or max_points < 3:
        raise ValueError(f"max_points: must be an int >= 3, got {max_points}")


def embedding_plot(
    features: torch.Tensor,
    assignments: torch.Tensor,
    labels: torch.Tensor | None = None,
    method: str = "pca",
    max_points: int = 2000,
    seed: int = 0,
) -> Figure:
    """2-D map of ``features`` coloured by prototype assignment and (right panel) by label.

    At most ``max_points`` points are drawn, a uniform random subset chosen with ``seed`` (which
    also seeds t-SNE).  ``method``: ``"pca"`` (fast, linear) or ``"tsne"`` (local structure).
    One panel when ``labels`` is None.
    """
    _check_embedding_args(features, assignments, labels, method, max_points)
    n = features.shape[0]
    keep = torch.arange(n)
    if n > max_points:
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_points]
    points = _project_2d(features.detach().float().cpu()[keep].numpy(), method, seed)
    panels = [(assignments.cpu()[keep].numpy(), "prototype")]
    if labels is not None:
        panels.append((labels.cpu()[keep].numpy(), "label"))
    fig = Figure(figsize=(4.2 * len(panels), 4.2), dpi=100)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (colours, title) in zip(axes, panels):
        _scatter(ax, points, colours, title)
    fig.suptitle(f"{method.upper()} of {len(keep)} of {n} features", fontsize=10)
    return fig
