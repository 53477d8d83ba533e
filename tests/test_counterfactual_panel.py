"""Counterfactual panels: every image on some page, success and failure as the results say,
the signed change on a shared scale with a colour bar, the clusters' members beside each row."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from swav.counterfactual_panel import PanelData, counterfactual_pages, counterfactual_panel

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def normalised(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - 0.5) / 0.5


def panel_data(n: int = 5) -> PanelData:
    g = torch.Generator().manual_seed(1)
    pixels = 0.2 + 0.6 * torch.rand(n, 3, 8, 8, generator=g)
    edited = pixels.clone()
    edited[:, :, :4] += 0.1  # top half brightened by 0.1 in every channel
    edited[0, :, 4:] -= 0.2  # image 0: bottom half darkened by 0.2
    source = torch.arange(n) % 3
    target = (source + 1) % 3
    success = torch.tensor([i % 2 == 0 for i in range(n)])
    assigned = torch.where(success, target, source)
    members = {k: normalised(torch.full((2, 3, 8, 8), 0.1 * (k + 1))) for k in range(3)}
    return PanelData(normalised(pixels), normalised(edited), source, target, assigned,
                     torch.full((n,), 0.31), torch.full((n,), 0.27), torch.full((n,), 0.2),
                     success, members, {k: f"n={10 + k} · '{k}' 90%" for k in range(3)})


def row_axes(fig, row: int):
    """The five image axes of a row (5 per row, then the colour bar)."""
    images = [ax for ax in fig.axes if ax.get_images()]
    return images[5 * row:5 * row + 5]


def test_every_image_appears_on_a_page_and_titles_say_which(tmp_path):
    data = panel_data(11)
    pages = counterfactual_pages(data, "ce", margin=0.1, per_page=4, mean=MEAN, std=STD)
    assert len(pages) == 3
    titles = [p._suptitle.get_text() for p in pages]
    assert titles[0].startswith("ce: images 1-4 of 11; 6 of 11 reached their target (the "
                                "target leads the runner-up by a log-odds margin >= 0.1)")
    assert titles[2].startswith("ce: images 9-11 of 11")
    shown = [len([ax for ax in p.axes if ax.get_images()]) for p in pages]  # 5 a row
    assert shown == [20, 20, 15]
    assert "the target is the most likely cluster" in counterfactual_pages(
        data, "logit", margin=0.0)[0]._suptitle.get_text()
    pages[2].savefig(tmp_path / "page.png")
    assert (tmp_path / "page.png").read_bytes()[:4] == b"\x89PNG"


def test_a_row_shows_both_clusters_the_change_and_the_verdict():
    data = panel_data(5)
    fig = counterfactual_panel(data, mean=MEAN, std=STD)
    headers = [t.get_text() for t in fig.texts]
    assert headers == ["source cluster\n(top members)", "original", "counterfactual",
                       "change", "target cluster\n(top members)"]
    for row in range(5):
        members_s, original, cf, change, members_t = row_axes(fig, row)
        s, t = int(data.source[row]), int(data.target[row])
        assert members_s.get_title() == f"cluster {s} · n={10 + s}\n'{s}' 90%"
        assert members_t.get_title() == f"cluster {t} · n={10 + t}\n'{t}' 90%"
        mosaic = np.asarray(members_t.get_images()[0].get_array())
        assert mosaic.shape == (2 * 8 + 1, 2 * 8 + 1, 3)  # 2 x 2 members, white between
        np.testing.assert_allclose(mosaic[:8, :8], 0.1 * (t + 1), atol=1e-6)  # the best
        np.testing.assert_allclose(mosaic[:8, 9:], 0.1 * (t + 1), atol=1e-6)
        assert (mosaic[9:] == 1.0).all()  # it has 2 members: the second row is blank
        assert original.get_title() == f"#{row + 1}  cluster {s}, p=0.31"
        assert cf.get_title() == f"cluster {t}, p=0.27\nrunner-up p=0.20"
        verdict = cf.get_xlabel()
        if row % 2 == 0:
            assert verdict == "reached"
        else:  # shown as a failure, in red
            assert verdict == f"NOT reached: cluster {s} wins"
            assert cf.xaxis.label.get_color() == "#c62828"
    change = np.asarray(row_axes(fig, 0)[3].get_images()[0].get_array())
    np.testing.assert_allclose(change[:4], 0.1, atol=1e-5)  # pixel units, channel mean
    np.testing.assert_allclose(change[4:], -0.2, atol=1e-5)
    image = row_axes(fig, 1)[3].get_images()[0]
    assert image.get_clim() == pytest.approx((-0.2, 0.2))  # one symmetric scale for the page
    bars = [ax for ax in fig.axes if ax.get_label() == "colour bar"]
    assert len(bars) == 1 and "pixel change" in bars[0].get_ylabel()


def test_a_failure_with_the_target_first_but_short_of_the_margin_says_so():
    data = panel_data(2)
    data.assigned[1] = data.target[1]  # the target wins, but not by the margin
    fig = counterfactual_panel(data)
    assert row_axes(fig, 1)[2].get_xlabel() == "NOT reached: lead below the margin"


def test_panels_reject_bad_input():
    data = panel_data(3)
    del data.members[2]
    with pytest.raises(ValueError, match="^members: none given for cluster 2"):
        counterfactual_panel(data)
    data = panel_data(3)
    data.counterfactual = data.counterfactual[:2]
    with pytest.raises(ValueError, match="^counterfactual:"):
        counterfactual_pages(data, "ce", 0.1)
    data = panel_data(3)
    data.success = data.success.int()
    with pytest.raises(ValueError, match="^success:"):
        counterfactual_panel(data)
    with pytest.raises(ValueError, match="^per_page:"):
        counterfactual_pages(panel_data(3), "ce", 0.1, per_page=0)
