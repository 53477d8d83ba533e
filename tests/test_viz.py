"""Figures: contents of the axes, PNG output and argument checks (galleries: test_gallery.py,
counterfactual panels: test_counterfactual_panel.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from swav.viz import denormalize, embedding_plot, multicrop_figure

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def normalised(images: torch.Tensor) -> torch.Tensor:
    return (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def assert_png(fig: Figure, path) -> None:
    fig.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_denormalize_inverts_normalisation():
    pixels = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(denormalize(normalised(pixels), MEAN, STD), pixels)
    with pytest.raises(ValueError, match="^mean:"):
        denormalize(pixels, (0.5, 0.5), STD)


# -- embedding plot ----------------------------------------------------------------------------

@pytest.fixture
def embedded():
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(90) % 3
    features = 4 * torch.randn(3, 16, generator=g)[labels] + torch.randn(90, 16, generator=g)
    return features, (labels + 1) % 3, labels


def pairwise(points: np.ndarray) -> np.ndarray:
    return np.linalg.norm(points[:, None] - points[None], axis=-1)


def test_embedding_plot_pca_labels_with_a_legend_and_prototype_markers(embedded, tmp_path):
    features, assignments, labels = embedded
    fig = embedding_plot(features, assignments, labels)
    by_label, by_cluster = fig.axes
    offsets = np.concatenate([np.asarray(c.get_offsets()) for c in by_label.collections])
    assert offsets.shape == (90, 2)
    centred = features.double() - features.double().mean(0)
    u, sv, v = torch.linalg.svd(centred, full_matrices=False)
    expected = (centred @ v[:2].T).numpy()  # PCA up to sign: same pairwise distances
    order = np.concatenate([np.nonzero(labels.numpy() == k)[0] for k in range(3)])
    np.testing.assert_allclose(pairwise(offsets), pairwise(expected[order]), atol=1e-3)
    legend = by_label.get_legend()
    assert legend.get_title().get_text() == "label"
    assert [t.get_text() for t in legend.get_texts()] == ["0", "1", "2"]
    named = embedding_plot(features, assignments, labels, class_names=["cat", "dog", "ship"])
    assert [t.get_text() for t in named.axes[0].get_legend().get_texts()] == ["cat", "dog",
                                                                              "ship"]
    share = (sv[:2] ** 2 / (sv ** 2).sum()).tolist()
    assert by_label.get_xlabel() == f"PC 1 ({share[0]:.0%} of the variance)"
    assert by_label.get_ylabel() == f"PC 2 ({share[1]:.0%} of the variance)"
    # One diamond per used prototype at the mean of its points, not one colour per prototype.
    points, markers = by_cluster.collections
    centres = np.asarray(markers.get_offsets())
    all_points = np.asarray(points.get_offsets())
    assert centres.shape == (3, 2)
    for k in range(3):
        np.testing.assert_allclose(centres[k], all_points[assignments.numpy() == k].mean(0),
                                   atol=1e-4)
    assert [t.get_text() for t in by_cluster.texts] == ["0", "1", "2"]
    assert fig._suptitle.get_text().startswith("PCA of the backbone features of 90 of 90 ")
    assert_png(fig, tmp_path / "pca.png")


def test_embedding_plot_tsne_subsampled_single_panel(embedded):
    features, assignments, _ = embedded
    fig = embedding_plot(features, assignments, method="tsne", max_points=60, seed=1)
    assert len(fig.axes) == 1
    points = np.asarray(fig.axes[0].collections[0].get_offsets())
    assert points.shape == (60, 2) and np.isfinite(points).all()
    assert fig.axes[0].get_xlabel() == "t-SNE 1"
    assert fig._suptitle.get_text().startswith("t-SNE of ")


def test_embedding_plot_rejects_bad_input(embedded):
    features, assignments, labels = embedded
    with pytest.raises(ValueError, match="^features:"):
        embedding_plot(features[0], assignments)
    with pytest.raises(ValueError, match="^assignments:"):
        embedding_plot(features, assignments[:10])
    with pytest.raises(ValueError, match="^labels:"):
        embedding_plot(features, assignments, labels.float())
    with pytest.raises(ValueError, match="^method:"):
        embedding_plot(features, assignments, method="umap")


# -- multi-crop figure -------------------------------------------------------------------------

def test_multicrop_figure_rows_of_an_image_and_its_crops(tmp_path):
    g = torch.Generator().manual_seed(3)
    originals = torch.rand(3, 3, 10, 10, generator=g)
    crops = [normalised(torch.rand(3, 3, 8, 8, generator=g)) for _ in range(2)] + \
        [normalised(torch.rand(3, 3, 6, 6, generator=g))]
    names = ["global 1 (8 px)", "global 2 (8 px)", "local 1 (6 px)"]
    fig = multicrop_figure(originals, crops, names, MEAN, STD)
    assert len(fig.axes) == 3 * 4
    assert [ax.get_title() for ax in fig.axes[:4]] == ["original (10x10)", *names]
    assert all(ax.get_title() == "" for ax in fig.axes[4:])
    np.testing.assert_allclose(np.asarray(fig.axes[4].get_images()[0].get_array()),
                               originals[1].permute(1, 2, 0).numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(fig.axes[4 + 3].get_images()[0].get_array()),
                               denormalize(crops[2][1:2], MEAN, STD)[0].permute(1, 2, 0).numpy(),
                               atol=1e-6)
    assert_png(fig, tmp_path / "crops.png")
    with pytest.raises(ValueError, match="^names:"):
        multicrop_figure(originals, crops, names[:2])
    with pytest.raises(ValueError, match=r"^crops\[1\]:"):
        multicrop_figure(originals, [crops[0], crops[1][:2]], names[:2])
