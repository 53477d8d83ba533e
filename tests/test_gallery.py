"""Cluster galleries: which members each row shows, captions with sizes and majority labels, a
layout without empty bands, the index of every used prototype."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from swav.gallery import clusters, prototype_grid, prototype_index

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def normalised(images: torch.Tensor) -> torch.Tensor:
    return (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@pytest.fixture
def members():
    """Prototype sizes: 2 -> 10, 0 -> 7, 4 -> 3 (1 and 3 empty); scores random; labels: 2 holds
    eight 5s and two 1s, 0 holds four 3s and three 7s, 4 three 1s."""
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(20, generator=g)
    assignments = torch.tensor([2] * 10 + [0] * 7 + [4] * 3)[order]
    labels = torch.tensor([5] * 8 + [1] * 2 + [3] * 4 + [7] * 3 + [1] * 3)[order]
    pixels = torch.rand(20, 3, 6, 5, generator=g)
    return pixels, assignments, torch.randn(20, generator=g), labels


def test_clusters_by_size_members_by_score_with_majority_labels(members):
    _, assignments, scores, labels = members
    found = clusters(assignments, scores, labels)
    assert list(found) == [2, 0, 4]
    assert [(c.size, c.majority) for c in found.values()] == [(10, 5), (7, 3), (3, 1)]
    assert found[2].share == pytest.approx(0.8) and found[0].share == pytest.approx(4 / 7)
    for k, cluster in found.items():
        assert sorted(cluster.members.tolist()) == torch.nonzero(assignments == k).flatten().tolist()
        assert torch.all(scores[cluster.members][:-1] >= scores[cluster.members][1:])
    assert found[2].caption() == "proto 2 · n=10 · '5' 80%"
    assert found[0].caption(short=True) == "0 · 7 · '3'"
    assert clusters(assignments, scores)[2].caption() == "proto 2 · n=10"


def test_prototype_grid_rows_show_the_best_members_captioned(members, tmp_path):
    pixels, assignments, scores, labels = members
    fig = prototype_grid(normalised(pixels), assignments, scores, labels, n_prototypes_shown=2,
                         per_prototype=4, mean=MEAN, std=STD)
    assert len(fig.axes) == 2
    assert [ax.get_ylabel() for ax in fig.axes] == ["proto 2\nn=10 · '5' 80%",
                                                    "proto 0\nn=7 · '3' 57%"]
    assert fig._suptitle.get_text().startswith("2 most populated of 3 used prototypes")
    for ax, k in zip(fig.axes, (2, 0)):
        strip = np.asarray(ax.get_images()[0].get_array())
        assert strip.shape == (6, 4 * (5 + 1) - 1, 3)
        members_k = torch.nonzero(assignments == k).flatten()
        best = members_k[scores[members_k].argsort(descending=True)[:4]]
        for slot, index in enumerate(best):
            cell = strip[:, slot * 6:slot * 6 + 5]
            np.testing.assert_allclose(cell, pixels[index].permute(1, 2, 0).numpy(), atol=1e-5)
    fig.savefig(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_prototype_grid_has_no_empty_band_and_takes_a_chosen_list(members):
    pixels, assignments, scores, labels = members
    for shown in (1, 3):
        fig = prototype_grid(pixels, assignments, scores, n_prototypes_shown=shown)
        boxes = [ax.get_position() for ax in fig.axes]
        height = fig.get_figheight()
        covered = sum(b.height for b in boxes) * height  # inches of image rows
        assert height - covered < 0.5 + 0.05 * shown  # the title line and thin gaps only
        gaps = [a.y0 - b.y1 for a, b in zip(boxes, boxes[1:])]
        assert all(0 <= g * height < 0.1 for g in gaps)
    fig = prototype_grid(pixels, assignments, scores, labels, prototypes=[4, 2])
    assert [ax.get_ylabel().split("\n")[0] for ax in fig.axes] == ["proto 4", "proto 2"]
    assert fig._suptitle.get_text().startswith("2 chosen of 3 used prototypes")
    with pytest.raises(ValueError, match="^prototypes: 1 holds none of the images"):
        prototype_grid(pixels, assignments, scores, prototypes=[1])


def test_prototype_index_shows_every_used_prototype_by_its_best_member(members):
    pixels, assignments, scores, labels = members
    fig = prototype_index(pixels, assignments, scores, labels, columns=2)
    assert len(fig.axes) == 3
    assert [ax.get_xlabel() for ax in fig.axes] == ["2 · 10 · '5'", "0 · 7 · '3'", "4 · 3 · '1'"]
    for ax, k in zip(fig.axes, (2, 0, 4)):
        members_k = torch.nonzero(assignments == k).flatten()
        best = members_k[scores[members_k].argmax()]
        np.testing.assert_allclose(np.asarray(ax.get_images()[0].get_array()),
                                   pixels[best].permute(1, 2, 0).numpy(), atol=1e-6)
    first, third = fig.axes[0].get_position(), fig.axes[2].get_position()
    assert third.y1 < first.y0  # two columns: the third sits on the second row
    assert "all 3 used prototypes" in fig._suptitle.get_text()


def test_galleries_reject_bad_input(members):
    pixels, assignments, scores, labels = members
    with pytest.raises(ValueError, match="^images:"):
        prototype_grid(pixels[0], assignments, scores)
    with pytest.raises(ValueError, match="^assignments:"):
        prototype_grid(pixels, assignments[:-1], scores)
    with pytest.raises(ValueError, match="^scores:"):
        prototype_grid(pixels, assignments, scores[:, None])
    with pytest.raises(ValueError, match="^labels:"):
        prototype_index(pixels, assignments, scores, labels.float())
    with pytest.raises(ValueError, match="^per_prototype:"):
        prototype_grid(pixels, assignments, scores, per_prototype=0)
    with pytest.raises(ValueError, match="^assignments: must be >= 0"):
        prototype_index(pixels, assignments - 1, scores)


def test_class_names_replace_label_indices_in_captions_and_widen_the_label_column(members):
    pixels, assignments, scores, labels = members
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
    found = clusters(assignments, scores, labels, names)
    assert found[2].caption() == "proto 2 · n=10 · 'five' 80%"
    assert found[2].caption(short=True) == "2 · 10\n'five'"  # a name: its own line
    assert clusters(assignments, scores, labels, list("01234567"))[2].caption(short=True) == \
        "2 · 10 · '5'"
    index = prototype_index(pixels, assignments, scores, labels, class_names=names)
    assert [ax.get_xlabel() for ax in index.axes] == ["2 · 10\n'five'", "0 · 7\n'three'",
                                                      "4 · 3\n'one'"]
    plain = prototype_grid(pixels, assignments, scores, labels)
    long = ["a class name far longer than the column"] * 8
    wide = prototype_grid(pixels, assignments, scores, labels, class_names=long)
    assert wide.axes[0].get_ylabel() == "proto 2\nn=10 · 'a class name far …' 80%"

    def left_in(fig):
        return fig.axes[0].get_position().x0 * fig.get_figwidth()

    assert left_in(wide) - left_in(plain) > 0.5  # room for 32 characters instead of 24
