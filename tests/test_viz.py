"""Figures: contents of the axes, PNG output and argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from swav.viz import counterfactual_panel, denormalize, embedding_plot, prototype_grid

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


# -- prototype grid ----------------------------------------------------------------------------

@pytest.fixture
def members():
    """Prototype sizes: 2 -> 10, 0 -> 7, 4 -> 3 (1 and 3 empty); scores random."""
    g = torch.Generator().manual_seed(0)
    assignments = torch.tensor([2] * 10 + [0] * 7 + [4] * 3)[torch.randperm(20, generator=g)]
    pixels = torch.rand(20, 3, 6, 5, generator=g)
    return pixels, assignments, torch.randn(20, generator=g)


def test_prototype_grid_rows_by_size_best_members_first(members, tmp_path):
    pixels, assignments, scores = members
    fig = prototype_grid(normalised(pixels), assignments, scores, n_prototypes_shown=2,
                         per_prototype=4, mean=MEAN, std=STD)
    assert len(fig.axes) == 2
    assert [ax.get_ylabel() for ax in fig.axes] == ["proto 2\nn=10", "proto 0\nn=7"]
    for ax, k in zip(fig.axes, (2, 0)):
        (image,) = ax.get_images()
        strip = np.asarray(image.get_array())
        assert strip.shape == (6, 4 * (5 + 1) - 1, 3)
        members_k = torch.nonzero(assignments == k).flatten()
        best = members_k[scores[members_k].argsort(descending=True)[:4]]
        for slot, index in enumerate(best):
            cell = strip[:, slot * 6:slot * 6 + 5]
            np.testing.assert_allclose(cell, pixels[index].permute(1, 2, 0).numpy(), atol=1e-5)
    assert_png(fig, tmp_path / "grid.png")


def test_prototype_grid_small_prototypes_and_grayscale(members):
    pixels, assignments, scores = members
    fig = prototype_grid(pixels[:, :1], assignments, scores, per_prototype=8)
    assert len(fig.axes) == 3  # only the 3 non-empty prototypes
    assert fig.axes[2].get_ylabel() == "proto 4\nn=3"
    strip = np.asarray(fig.axes[2].get_images()[0].get_array())
    assert strip.shape == (6, 8 * 6 - 1)
    assert (strip[:, 3 * 6:] == 1.0).all()  # 5 empty slots left white


def test_prototype_grid_rejects_bad_shapes(members):
    pixels, assignments, scores = members
    with pytest.raises(ValueError, match="^images:"):
        prototype_grid(pixels[0], assignments, scores)
    with pytest.raises(ValueError, match="^images:"):
        prototype_grid(torch.rand(20, 2, 4, 4), assignments, scores)
    with pytest.raises(ValueError, match="^assignments:"):
        prototype_grid(pixels, assignments[:-1], scores)
    with pytest.raises(ValueError, match="^scores:"):
        prototype_grid(pixels, assignments, scores[:, None])
    with pytest.raises(ValueError, match="^per_prototype:"):
        prototype_grid(pixels, assignments, scores, per_prototype=0)


# -- counterfactual panel ----------------------------------------------------------------------

@pytest.fixture
def counterfactuals():
    g = torch.Generator().manual_seed(1)
    pixels = 0.2 + 0.6 * torch.rand(5, 3, 8, 8, generator=g)
    edited = pixels.clone()
    edited[:, :, :4] += 0.1  # top half brightened by 0.1 in every channel
    return (normalised(pixels), normalised(edited), torch.tensor([1, 2, 3, 4, 0]),
            torch.tensor([4, 0, 1, 2, 3]), torch.tensor([0.934, 0.5, 0.6, 0.7, 0.8]),
            torch.tensor([0.876, 0.51, 0.61, 0.71, 0.81]))


def test_counterfactual_panel_rows_titles_and_difference(counterfactuals, tmp_path):
    fig = counterfactual_panel(*counterfactuals, mean=MEAN, std=STD, n=3, amplify=5.0)
    assert len(fig.axes) == 9 and all(len(ax.get_images()) == 1 for ax in fig.axes)
    assert fig.axes[0].get_title() == "cluster 1, p=0.93"
    assert fig.axes[1].get_title() == "cluster 4, p=0.88"
    diff = np.asarray(fig.axes[2].get_images()[0].get_array())
    np.testing.assert_allclose(diff[:4], 0.5, atol=1e-4)  # 5 * 0.1
    np.testing.assert_allclose(diff[4:], 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(fig.axes[3].get_images()[0].get_array()),
                               denormalize(counterfactuals[0][1:2], MEAN, STD)[0]
                               .permute(1, 2, 0).numpy(), atol=1e-6)
    assert_png(fig, tmp_path / "cf.png")


def test_counterfactual_panel_clips_and_caps_rows(counterfactuals):
    fig = counterfactual_panel(*counterfactuals, mean=MEAN, std=STD, amplify=50.0)
    assert len(fig.axes) == 15  # n=8 > 5 images
    diff = np.asarray(fig.axes[2].get_images()[0].get_array())
    assert diff.max() == 1.0


def test_counterfactual_panel_rejects_bad_input(counterfactuals):
    original, edited, source, target, p_s, p_t = counterfactuals
    with pytest.raises(ValueError, match="^original:"):
        counterfactual_panel(original[0], edited[0], source, target, p_s, p_t)
    with pytest.raises(ValueError, match="^counterfactual:"):
        counterfactual_panel(original, edited[:4], source, target, p_s, p_t)
    with pytest.raises(ValueError, match="^target:"):
        counterfactual_panel(original, edited, source, target[:2], p_s, p_t)
    with pytest.raises(ValueError, match="^amplify:"):
        counterfactual_panel(original, edited, source, target, p_s, p_t, amplify=0.0)


# -- embedding plot ----------------------------------------------------------------------------

@pytest.fixture
def embedded():
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(90) % 3
    features = 4 * torch.randn(3, 16, generator=g)[labels] + torch.randn(90, 16, generator=g)
    return features, (labels + 1) % 3, labels


def pairwise(points: np.ndarray) -> np.ndarray:
    return np.linalg.norm(points[:, None] - points[None], axis=-1)


def test_embedding_plot_pca_two_panels(embedded, tmp_path):
    features, assignments, labels = embedded
    fig = embedding_plot(features, assignments, labels)
    assert len(fig.axes) == 2
    offsets = [np.asarray(ax.collections[0].get_offsets()) for ax in fig.axes]
    assert all(o.shape == (90, 2) for o in offsets)
    centred = features.double() - features.double().mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    expected = (centred @ v[:2].T).numpy()  # PCA up to sign: same pairwise distances
    np.testing.assert_allclose(pairwise(offsets[0]), pairwise(expected), atol=1e-3)
    np.testing.assert_array_equal(fig.axes[1].collections[0].get_array(), labels.numpy())
    assert_png(fig, tmp_path / "pca.png")


def test_embedding_plot_tsne_subsampled_single_panel(embedded):
    features, assignments, _ = embedded
    fig = embedding_plot(features, assignments, method="tsne", max_points=60, seed=1)
    assert len(fig.axes) == 1
    points = np.asarray(fig.axes[0].collections[0].get_offsets())
    assert points.shape == (60, 2) and np.isfinite(points).all()


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
