"""Cluster galleries: what each prototype holds, as a reader can check it.

* :func:`prototype_grid`: for the most populated prototypes (or any list of them), their members
  with the highest scores, one row each, labelled with the prototype's size and, when labels
  exist, its majority label and that label's share: the qualitative cluster inspection of
  DeepCluster (Caron et al., 2018, Fig. 4) and SwAV's prototype visualisations.
* :func:`prototype_index`: every used prototype as one representative image (its best-scoring
  member), most populated first, so the whole clustering fits on one page.

Both lay their images out on exact figure coordinates (no ``tight_layout``): the figure is as
large as its content, with no empty bands however many rows there are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from matplotlib.figure import Figure

from swav.evaluation import majority_labels
from swav.viz import (
    _check_images,
    _check_positive_int,
    _check_vector,
    _show,
    _strip,
    _to_hwc,
    denormalize,
)

__all__ = ["Cluster", "clusters", "label_name", "prototype_grid", "prototype_index"]


class Cluster:
    """One prototype's members: ``index``, ``size``, ``members`` (indices, best score first),
    ``majority`` label, its ``share`` of the members and its ``name`` (None without labels; the
    label's index where the data names no classes)."""

    def __init__(self, index: int, size: int, members: torch.Tensor, majority: int | None,
                 share: float | None, name: str | None = None) -> None:
        self.index, self.size, self.members = index, size, members
        self.majority, self.share = majority, share
        self.name = name if name is not None or majority is None else str(majority)

    def contents(self) -> str:
        """``"n=40 · 'cat' 95%"``: size, and majority label with its share when labelled."""
        label = "" if self.name is None else f" · '{_short(self.name)}' {self.share:.0%}"
        return f"n={self.size}{label}"

    def caption(self, short: bool = False) -> str:
        """``"proto 12 · n=40 · 'cat' 95%"`` (``short``: ``"12 · 40 · '3'"``, a class name on a
        line of its own: ``"12 · 40\\n'cat'"``)."""
        if short:
            if self.name is None:
                return f"{self.index} · {self.size}"
            sep = " · " if self.name == str(self.majority) else "\n"
            return f"{self.index} · {self.size}{sep}'{_short(self.name, 12)}'"
        return f"proto {self.index} · {self.contents()}"


def _short(name: str, most: int = 18) -> str:
    return name if len(name) <= most else name[:most - 1] + "…"


def clusters(assignments: torch.Tensor, scores: torch.Tensor,
             labels: torch.Tensor | None = None,
             class_names: Sequence[str] | None = None) -> dict[int, Cluster]:
    """Every used prototype, most populated first (ties: lower index first); ``class_names``:
    the name of each label value."""
    _check_vector("assignments", assignments, assignments.shape[0], integer=True)
    n = assignments.shape[0]
    _check_vector("scores", scores, n, integer=False)
    if labels is not None:
        _check_vector("labels", labels, n, integer=True)
    if n and int(assignments.min()) < 0:
        raise ValueError(f"assignments: must be >= 0, got {int(assignments.min())}")
    a, s = assignments.long().cpu(), scores.detach().float().cpu()
    sizes = torch.bincount(a)
    order = sorted(torch.nonzero(sizes).flatten().tolist(), key=lambda k: (-int(sizes[k]), k))
    majority = share = None
    if labels is not None:
        majority, share = majority_labels(a, labels, len(sizes))
    out = {}
    for k in order:
        members = torch.nonzero(a == k).flatten()
        members = members[s[members].argsort(descending=True, stable=True)]
        label = None if majority is None else int(majority[k])
        out[k] = Cluster(k, int(sizes[k]), members, label,
                         None if share is None else float(share[k]),
                         label_name(label, class_names))
    return out


def label_name(label: int | None, class_names: Sequence[str] | None) -> str | None:
    """``class_names[label]``, or the label's index where there are no names for it."""
    if label is None:
        return None
    if class_names is not None and 0 <= label < len(class_names):
        return str(class_names[label])
    return str(label)


def _chosen(found: dict[int, Cluster], prototypes: Sequence[int] | None,
            n_shown: int) -> list[Cluster]:
    if prototypes is None:
        return list(found.values())[:n_shown]
    empty = [k for k in prototypes if k not in found]
    if empty:
        raise ValueError(f"prototypes: {empty[0]} holds none of the images")
    return [found[k] for k in prototypes]


def prototype_grid(
    images: torch.Tensor,
    assignments: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor | None = None,
    n_prototypes_shown: int = 16,
    per_prototype: int = 8,
    prototypes: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
) -> Figure:
    """Members of the ``n_prototypes_shown`` most populated prototypes, or of ``prototypes``.

    One row per prototype, top to bottom by decreasing size (or in the order given); each shows
    its ``per_prototype`` members with the highest ``scores`` (e.g. those of
    :func:`swav.evaluation.assign_with_scores`), best first, de-normalised with ``mean``/``std``,
    captioned ``proto k · n=size · 'label' share`` (the label part only with ``labels``, named by
    ``class_names`` where given).  The title says how many of the used prototypes are shown.
    """
    _check_images("images", images)
    n = images.shape[0]
    _check_vector("assignments", assignments, n, integer=True)
    _check_positive_int("n_prototypes_shown", n_prototypes_shown)
    _check_positive_int("per_prototype", per_prototype)
    found = clusters(assignments, scores, labels, class_names)
    rows = _chosen(found, prototypes, n_prototypes_shown)
    pixels = denormalize(images, mean, std)
    height, width = images.shape[2:]
    row_in = 0.62  # inches per row
    strip_in = row_in * per_prototype * (width + 1) / height
    longest = max(len(line) for c in rows for line in c.caption().split(" · ", 1))
    label_in, title_in, pad_in = max(1.55, 0.15 + 0.062 * longest), 0.42, 0.04  # 8 pt text
    fig_w, fig_h = label_in + strip_in + 0.1, title_in + len(rows) * (row_in + pad_in)
    fig = Figure(figsize=(fig_w, fig_h), dpi=100)
    for i, cluster in enumerate(rows):
        bottom = fig_h - title_in - (i + 1) * (row_in + pad_in) + pad_in / 2
        ax = fig.add_axes((label_in / fig_w, bottom / fig_h, strip_in / fig_w, row_in / fig_h))
        _show(ax, _strip(pixels[cluster.members[:per_prototype]], per_prototype))
        ax.set_ylabel(cluster.caption().replace(" · ", "\n", 1), rotation=0, ha="right",
                      va="center", fontsize=8)
        for side in ax.spines.values():
            side.set_visible(False)
    which = "chosen" if prototypes is not None else "most populated"
    fig.suptitle(f"{len(rows)} {which} of {len(found)} used prototypes: top {per_prototype} "
                 f"members by score" + (", majority label and its share" if labels is not None
                                        else ""),
                 fontsize=9, y=1 - 0.12 / fig_h, va="top")
    return fig


def prototype_index(
    images: torch.Tensor,
    assignments: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor | None = None,
    columns: int = 12,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
) -> Figure:
    """Every used prototype as its best-scoring member, most populated first, ``columns`` a
    row, each captioned ``index · size`` (and ``· 'majority label'`` with ``labels``, named by
    ``class_names`` where given)."""
    _check_images("images", images)
    _check_vector("assignments", assignments, images.shape[0], integer=True)
    _check_positive_int("columns", columns)
    found = list(clusters(assignments, scores, labels, class_names).values())
    pixels = denormalize(images, mean, std)
    cols = min(columns, len(found))
    rows = -(-len(found) // cols)
    two_lines = any("\n" in cluster.caption(short=True) for cluster in found)
    cell_in, caption_in, title_in = 0.9, 0.38 if two_lines else 0.24, 0.42
    fig_w, fig_h = cols * cell_in + 0.1, title_in + rows * (cell_in + caption_in)
    fig = Figure(figsize=(fig_w, fig_h), dpi=100)
    for i, cluster in enumerate(found):
        r, c = divmod(i, cols)
        bottom = fig_h - title_in - (r + 1) * (cell_in + caption_in) + caption_in
        side = cell_in - 0.08
        ax = fig.add_axes(((0.05 + c * cell_in + 0.04) / fig_w, bottom / fig_h, side / fig_w,
                           side / fig_h))
        _show(ax, _to_hwc(pixels[int(cluster.members[0])]))
        ax.set_xlabel(cluster.caption(short=True), fontsize=8, labelpad=1)
        for spine in ax.spines.values():
            spine.set_visible(False)
    fig.suptitle(f"all {len(found)} used prototypes, most populated first: best-scoring member, "
                 f"index · size" + (" · majority label" if labels is not None else ""),
                 fontsize=9, y=1 - 0.12 / fig_h, va="top")
    return fig
