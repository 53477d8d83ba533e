"""Figures for inspecting a SwAV model, and the image helpers the other figure modules share.

* :func:`embedding_plot`: a 2-D PCA or t-SNE (van der Maaten and Hinton, 2008) map of features,
  coloured by label, with the prototypes marked at the centres of their images.
* :func:`multicrop_figure`: training images beside their multi-crop views (as the CIFAR-10
  SwAV tutorials of the field draw them), to check the augmentations a run trains on.

Cluster galleries are in :mod:`swav.gallery`, counterfactual panels in
:mod:`swav.counterfactual_panel`.

Headless-safe without touching the global backend: figures are built with the object-oriented
:class:`matplotlib.figure.Figure` API (no :mod:`matplotlib.pyplot`), which renders through Agg in
``savefig`` whatever backend is selected, so nothing here calls ``matplotlib.use`` (which would
override a notebook's backend) or ``plt.show``, and figures are never registered with pyplot (no
leak when many are made).  Every function returns the :class:`~matplotlib.figure.Figure`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

__all__ = ["denormalize", "embedding_plot", "multicrop_figure"]

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


# -- embedding plot --------------------------------------------------------------------------

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


def _project_2d(features: np.ndarray, method: str, seed: int) -> tuple[np.ndarray, list[str]]:
    """PCA (sklearn, exact SVD) or t-SNE (sklearn Barnes-Hut, PCA initialisation) to 2-D, with
    the axis names (PCA: each component's share of the variance).

    t-SNE runs with one OpenMP thread: its OpenMP gradient loop slows down by an order of
    magnitude when the cores are shared.
    """
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, svd_solver="full")
        points = pca.fit_transform(features)
        return points, [f"PC {i + 1} ({share:.0%} of the variance)"
                        for i, share in enumerate(pca.explained_variance_ratio_)]
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    perplexity = min(30.0, (features.shape[0] - 1) / 3.0)
    with threadpool_limits(limits=1):
        points = TSNE(n_components=2, perplexity=perplexity, init="pca",
                      random_state=seed).fit_transform(features)
    return points, ["t-SNE 1", "t-SNE 2"]


def _label_colours(labels: np.ndarray) -> dict[int, Any]:
    """One colour per label value (tab10 / tab20, else a evenly spaced hues)."""
    from matplotlib import colormaps

    values = sorted(int(v) for v in np.unique(labels))
    if len(values) <= 10:
        cmap, spots = colormaps["tab10"], [i / 10 + 0.05 for i in range(len(values))]
    elif len(values) <= 20:
        cmap, spots = colormaps["tab20"], [i / 20 + 0.025 for i in range(len(values))]
    else:
        cmap, spots = colormaps["hsv"], list(np.linspace(0, 1, len(values), endpoint=False))
    return {v: cmap(s) for v, s in zip(values, spots)}


def _axes_names(ax, names: list[str]) -> None:
    ax.set_xlabel(names[0], fontsize=8)
    ax.set_ylabel(names[1], fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _by_label(ax, points: np.ndarray, labels: np.ndarray, colours: dict[int, Any],
              names: list[str], class_names: Sequence[str] | None = None) -> None:
    for value, colour in colours.items():
        mask = labels == value
        named = str(value)
        if class_names is not None and 0 <= value < len(class_names):
            named = str(class_names[value])
        ax.scatter(points[mask, 0], points[mask, 1], color=colour, s=7, linewidths=0,
                   label=named)
    ax.legend(title="label", fontsize=7, title_fontsize=7, markerscale=2, loc="center left",
              bbox_to_anchor=(1.0, 0.5), frameon=False, ncols=1 if len(colours) <= 20 else 2)
    ax.set_title("held-out images, coloured by label", fontsize=9)
    _axes_names(ax, names)


def _by_cluster(ax, points: np.ndarray, assignments: np.ndarray, labels: np.ndarray | None,
                colours: dict[int, Any] | None, names: list[str], annotate: int) -> None:
    """Each used prototype as one marker at the mean of its images' points, sized by how many it
    holds, filled with its majority label's colour; the ``annotate`` largest are numbered."""
    ax.scatter(points[:, 0], points[:, 1], color="0.85", s=5, linewidths=0)
    used, sizes = np.unique(assignments, return_counts=True)
    centres = np.stack([points[assignments == k].mean(0) for k in used])
    fill = ["white"] * len(used)
    if labels is not None and colours is not None:
        fill = [colours[int(np.bincount(labels[assignments == k]).argmax())] for k in used]
    ax.scatter(centres[:, 0], centres[:, 1], s=12 + 120 * sizes / sizes.max(), c=fill,
               marker="D", edgecolors="black", linewidths=0.6)
    for i in np.argsort(-sizes, kind="stable")[:annotate]:
        ax.annotate(str(int(used[i])), centres[i], fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    fill_note = "; fill: majority label" if labels is not None else ""
    ax.set_title(f"{len(used)} used prototypes, each at the centre of its images\n(size: "
                 f"images held{fill_note}; the {min(annotate, len(used))} largest numbered)",
                 fontsize=8)
    _axes_names(ax, names)


def embedding_plot(
    features: torch.Tensor,
    assignments: torch.Tensor,
    labels: torch.Tensor | None = None,
    method: str = "pca",
    max_points: int = 2000,
    seed: int = 0,
    annotate: int = 12,
    class_names: Sequence[str] | None = None,
) -> Figure:
    """2-D map of ``features``: the images coloured by label (with a legend), and the used
    prototypes as markers at the centre of their images (sized by how many they hold, filled with
    their majority label's colour); axes named by the projection (PCA: the variance each
    component explains).

    At most ``max_points`` points are drawn, a uniform random subset chosen with ``seed`` (which
    also seeds t-SNE).  ``method``: ``"pca"`` (fast, linear) or ``"tsne"`` (local structure).
    Without ``labels`` only the prototype panel is drawn; the legend names label values by
    ``class_names`` where given.
    """
    _check_embedding_args(features, assignments, labels, method, max_points)
    n = features.shape[0]
    keep = torch.arange(n)
    if n > max_points:
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_points]
    points, names = _project_2d(features.detach().float().cpu()[keep].numpy(), method, seed)
    assigned = assignments.cpu()[keep].numpy()
    y = None if labels is None else labels.cpu()[keep].numpy()
    colours = None if y is None else _label_colours(y)
    panels = 1 if y is None else 2
    # Stacked, not side by side: the MLflow UI shows a figure at its pane's width (~530 px).
    fig = Figure(figsize=(6.2, 4.9 * panels), dpi=100)
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0]
    if y is not None:
        _by_label(axes[0], points, y, colours, names, class_names)
    _by_cluster(axes[-1], points, assigned, y, colours, names, annotate)
    title = "PCA" if method == "pca" else "t-SNE"
    fig.suptitle(f"{title} of the backbone features of {len(keep)} of {n} held-out images",
                 fontsize=10)
    fig.tight_layout()
    return fig


# -- multi-crop figure -----------------------------------------------------------------------

def multicrop_figure(originals: torch.Tensor, crops: Sequence[torch.Tensor],
                     names: Sequence[str], mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None) -> Figure:
    """A few training images (``originals`` ``[n, C, H, W]`` in [0, 1]) beside each of their
    crops (``crops``: one normalised ``[n, C, h, w]`` tensor per crop, ``names`` their column
    headers, e.g. ``"global 1 (16 px)"``): the augmentations a run trains on, as the model sees
    them (de-normalised with ``mean``/``std``)."""
    _check_images("originals", originals)
    n = originals.shape[0]
    if len(crops) != len(names) or not crops:
        raise ValueError(f"names: expected one name per crop ({len(crops)}), got {len(names)}")
    for i, crop in enumerate(crops):
        _check_images(f"crops[{i}]", crop)
        if crop.shape[0] != n or crop.shape[1] != originals.shape[1]:
            raise ValueError(f"crops[{i}]: expected {n} images of {originals.shape[1]} "
                             f"channels, got {tuple(crop.shape)}")
    columns = 1 + len(crops)
    fig = Figure(figsize=(1.1 * columns + 0.2, 1.1 * n + 0.6), dpi=100)
    axes = fig.subplots(n, columns, squeeze=False)
    height, width = originals.shape[2:]
    for r in range(n):
        _show(axes[r, 0], _to_hwc(originals[r].detach().float().cpu().clamp(0, 1)),
              f"original ({height}x{width})" if r == 0 else None)
        for c, (crop, name) in enumerate(zip(crops, names), start=1):
            pixels = denormalize(crop[r:r + 1], mean, std)[0]
            _show(axes[r, c], _to_hwc(pixels), name if r == 0 else None)
    fig.suptitle(f"multi-crop views of {n} training images (each crop draws its own "
                 f"parameters)", fontsize=9)
    fig.tight_layout()
    return fig
