"""Counterfactual panels: what an edit changed, and what the clusters it moved between hold.

One row per explained image, five columns:

1. the top members of the image's own (source) cluster, a 2 x 2 mosaic, so the reader sees what
   the model means by that cluster;
2. the original, with its cluster and assignment probability;
3. the counterfactual, with the target cluster, its probability and the runner-up's, and whether
   it reached the target (:func:`swav.counterfactual.success`: the target leads the runner-up by
   the method's margin), failures in red;
4. the signed change in pixel space, averaged over channels, on a diverging scale shared by the
   page (red: brighter, blue: darker) with a colour bar in pixel units;
5. the top members of the target cluster.

:func:`counterfactual_pages` cuts any number of images into pages, so every explained image
appears and each title says which ones of how many it shows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure

from swav.viz import _check_images, _check_positive_int, _check_vector, _show, _strip, _to_hwc
from swav.viz import denormalize

__all__ = ["PanelData", "counterfactual_pages", "counterfactual_panel"]

_OK, _FAIL = "#1a7f37", "#c62828"


@dataclass
class PanelData:
    """What a panel shows, for ``N`` explained images (tensors on the CPU).

    ``original``/``counterfactual``: normalised images ``[N, C, H, W]``; ``source``, ``target``,
    ``assigned`` (the cluster that wins after the edit) ``[N]`` ints; ``prob_source`` (before the
    edit), ``prob_target`` and ``prob_runner_up`` (after it) ``[N]``; ``success`` ``[N]`` bool;
    ``members``: cluster -> its top members (normalised ``[m, C, H, W]``, best first);
    ``captions``: cluster -> e.g. ``"n=40 · '3' 95%"``.
    """

    original: torch.Tensor
    counterfactual: torch.Tensor
    source: torch.Tensor
    target: torch.Tensor
    assigned: torch.Tensor
    prob_source: torch.Tensor
    prob_target: torch.Tensor
    prob_runner_up: torch.Tensor
    success: torch.Tensor
    members: Mapping[int, torch.Tensor]
    captions: Mapping[int, str]

    def check(self) -> None:
        _check_images("original", self.original)
        if self.counterfactual.shape != self.original.shape:
            raise ValueError(f"counterfactual: expected shape {tuple(self.original.shape)} like "
                             f"original, got {tuple(self.counterfactual.shape)}")
        n = self.original.shape[0]
        for name in ("source", "target", "assigned"):
            _check_vector(name, getattr(self, name), n, integer=True)
        for name in ("prob_source", "prob_target", "prob_runner_up"):
            _check_vector(name, getattr(self, name), n, integer=False)
        if self.success.dtype != torch.bool or self.success.shape != (n,):
            raise ValueError(f"success: expected a bool [{n}] tensor")
        missing = sorted({int(k) for k in torch.cat([self.source, self.target])}
                         - set(self.members))
        if missing:
            raise ValueError(f"members: none given for cluster {missing[0]}")


def _mosaic(images: torch.Tensor, side: int, mean, std) -> np.ndarray:
    """Up to ``side * side`` members as a square mosaic, best first, row by row (white where a
    cluster has fewer)."""
    pixels = denormalize(images[:side * side], mean, std)
    rows = [_strip(pixels[r * side:(r + 1) * side], side) for r in range(side)]
    pad = np.ones((1, *rows[0].shape[1:]), dtype=rows[0].dtype)
    return np.concatenate([part for r in rows for part in (r, pad)][:-1], axis=0)


def _row_texts(d: PanelData, i: int) -> tuple[str, str, str]:
    s, t, a = int(d.source[i]), int(d.target[i]), int(d.assigned[i])
    before = f"cluster {s}, p={float(d.prob_source[i]):.2f}"
    after = f"cluster {t}, p={float(d.prob_target[i]):.2f}\nrunner-up p={float(d.prob_runner_up[i]):.2f}"
    verdict = "reached" if bool(d.success[i]) else (
        f"NOT reached: cluster {a} wins" if a != t else "NOT reached: lead below the margin")
    return before, after, verdict


def _cluster_title(d: PanelData, k: int) -> str:
    """``"cluster 3 · n=40\\n'cat' 95%"``: the label on a line of its own (class names are
    wider than the column)."""
    size, _, label = d.captions.get(k, "").partition(" · ")
    head = f"cluster {k} · {size}" if size else f"cluster {k}"
    return head + (f"\n{label}" if label else "")


def counterfactual_panel(data: PanelData, rows: Sequence[int] | None = None, side: int = 2,
                         mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                         title: str = "") -> Figure:
    """The panel of the images ``rows`` (default: all) of ``data``; see the module docstring."""
    data.check()
    _check_positive_int("side", side)
    rows = list(range(data.original.shape[0])) if rows is None else list(rows)
    if not rows:
        raise ValueError("rows: no images to show")
    x = denormalize(data.original[rows], mean, std)
    x_cf = denormalize(data.counterfactual[rows], mean, std)
    change = (x_cf - x).mean(1).numpy()  # [n, H, W], pixel units
    scale = max(float(np.abs(change).max()), 1e-3)
    ratios = [1.0, 1.0, 1.0, 1.0, 1.0, 0.07]
    row_in, head_in, foot_in = 1.9, 1.15, 0.3
    fig_h = head_in + row_in * len(rows) + foot_in
    fig = Figure(figsize=(8.6, fig_h), dpi=100)
    grid = fig.add_gridspec(len(rows), 6, width_ratios=ratios, left=0.02, right=0.89,
                            top=1 - head_in / fig_h, bottom=foot_in / fig_h, wspace=0.25,
                            hspace=0.75)
    image = None
    for r, i in enumerate(rows):
        s, t = int(data.source[i]), int(data.target[i])
        before, after, verdict = _row_texts(data, i)
        ok = bool(data.success[i])
        axes = [fig.add_subplot(grid[r, c]) for c in range(5)]
        _show(axes[0], _mosaic(data.members[s], side, mean, std), _cluster_title(data, s))
        _show(axes[1], _to_hwc(x[r]), f"#{i + 1}  {before}")
        _show(axes[2], _to_hwc(x_cf[r]), after)
        axes[2].set_xlabel(verdict, fontsize=9, color=_OK if ok else _FAIL, labelpad=2)
        image = axes[3].imshow(change[r], cmap="RdBu_r", vmin=-scale, vmax=scale,
                               interpolation="nearest")
        axes[3].set_xticks([])
        axes[3].set_yticks([])
        _show(axes[4], _mosaic(data.members[t], side, mean, std), _cluster_title(data, t))
        for ax in axes[1:3]:
            for spine in ax.spines.values():
                spine.set_edgecolor(_OK if ok or ax is axes[1] else _FAIL)
    bar = fig.colorbar(image, cax=fig.add_subplot(grid[:, 5], label="colour bar"))
    bar.set_label("pixel change (red brighter, blue darker)", fontsize=9)
    bar.ax.tick_params(labelsize=8)
    headers = ("source cluster\n(top members)", "original", "counterfactual",
               "change", "target cluster\n(top members)")
    top = 1 - (head_in - 0.45) / fig_h
    for c, text in enumerate(headers):
        box = grid[0, c].get_position(fig)
        fig.text((box.x0 + box.x1) / 2, top, text, ha="center", va="bottom", fontsize=10,
                 fontweight="bold")
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.08 / fig_h, va="top")
    for ax in fig.axes:
        ax.title.set_fontsize(8.5)
    return fig


def counterfactual_pages(data: PanelData, method: str, margin: float, per_page: int = 8,
                         side: int = 2, mean: Sequence[float] | None = None,
                         std: Sequence[float] | None = None) -> list[Figure]:
    """Every image of ``data`` on pages of ``per_page`` rows; each title names the method, the
    images it shows of how many, and how many reached their target."""
    data.check()
    _check_positive_int("per_page", per_page)
    n = data.original.shape[0]
    reached = int(data.success.sum())
    rule = (f"the target leads the runner-up by a log-odds margin >= {margin:g}" if margin > 0
            else "the target is the most likely cluster")
    pages = []
    for first in range(0, n, per_page):
        rows = list(range(first, min(first + per_page, n)))
        title = (f"{method}: images {rows[0] + 1}-{rows[-1] + 1} of {n}; {reached} of {n} "
                 f"reached their target ({rule})")
        pages.append(counterfactual_panel(data, rows, side, mean, std, title))
    return pages
