"""The crops figure: each image's own crops, made as the run makes them."""

from __future__ import annotations

import pytest
import torch

from orchestration.crops_figure import crop_examples, crop_names
from orchestration.preflight import load_experiment


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_crop_examples_give_each_image_its_own_crops_as_the_run_makes_them(tmp_path, device):
    """The figure's crops, one ``[n, 3, s, s]`` tensor per named crop, row i of every crop cut
    from image i (images of one flat grey each; no colour jitter): by PIL or batched."""
    from PIL import Image

    for i, level in enumerate((20, 90, 160, 230)):
        (tmp_path / f"c{i}").mkdir()
        for j in range(3):
            Image.new("RGB", (10, 10), (level,) * 3).save(tmp_path / f"c{i}" / f"{j}.png")
    cfg = load_experiment(None, ["data.source=imagefolder", f"data.path={tmp_path}",
                             "crops.color_strength=0", f"crops.device={device}"])
    originals, crops = crop_examples(cfg, n=4)
    assert len(crops) == len(crop_names(cfg)) == 6
    assert [tuple(c.shape) for c in crops] == [(4, 3, 16, 16)] * 2 + [(4, 3, 12, 12)] * 4
    levels = originals.mean(dim=(1, 2, 3))
    assert len(set(levels.tolist())) >= 2  # (the split is drawn: at least two levels among 4)
    mean, std = cfg.crops.mean[0], cfg.crops.std[0]
    for crop in crops:
        torch.testing.assert_close(crop.mean(dim=(1, 2, 3)) * std + mean, levels, atol=0.02,
                                   rtol=0)
