"""Tests for swav.batch_multicrop: multi-crop of uint8 batches on the training device.

Runs on CPU tensors (the code is device-agnostic).  Each operation is checked against
torchvision's functional reference; the random parameters against the PIL path's distributions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from swav.batch_multicrop import (
    BatchMultiCrop,
    _adjust_hue,
    _gaussian_blur,
    apply_color_jitter,
    crop_boxes,
)
from swav.multicrop import MultiCropTransform

NO_AUG = dict(color_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, flip_prob=0.0)
IDENTITY = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def colourful(b: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth colourful uint8 images [b, 3, size, size] (gradients per channel plus noise)."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    base = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                        1 - ramp[None, :].expand(size, size)])
    noise = torch.rand(b, 3, size, size, generator=g) * 0.3
    return ((0.7 * base + noise).clamp(0, 1) * 255).round().to(torch.uint8)


# -- layout, reproducibility, independence -----------------------------------------------------

def test_groups_are_crop_major_float_tensors_of_the_configured_sizes():
    crops = BatchMultiCrop([2, 4], [32, 16], [0.14, 0.05], [1.0, 0.14])(colourful(5))
    assert [tuple(c.shape) for c in crops] == [(10, 3, 32, 32), (20, 3, 16, 16)]
    assert all(c.dtype == torch.float32 for c in crops)


def test_full_scale_crop_without_augmentation_is_the_image_itself():
    images = colourful(3)
    aug = BatchMultiCrop([2], [32], [1.0], [1.0], **NO_AUG, **IDENTITY)
    (crops,) = aug(images)
    # Both crops of every image are the whole image (aspect 1 fits at scale 1: one box).
    expected = images.float().div(255).repeat(2, 1, 1, 1)
    torch.testing.assert_close(crops, expected, atol=1e-5, rtol=0)


def test_same_seed_same_crops_reseed_restarts_other_seed_differs():
    images = colourful(4)
    a, b = BatchMultiCrop([2], [16], [0.2], [1.0], seed=3), BatchMultiCrop([2], [16], [0.2], [1.0],
                                                                          seed=3)
    first = a(images)[0]
    torch.testing.assert_close(first, b(images)[0])
    assert not torch.equal(first, a(images)[0])  # the generator moves on
    a.reseed(3)
    torch.testing.assert_close(first, a(images)[0])
    a.reseed(4)
    assert not torch.equal(first, a(images)[0])


def test_every_image_of_a_batch_draws_its_own_parameters():
    same = colourful(1).expand(64, -1, -1, -1).contiguous()  # 64 copies of one image
    (crops,) = BatchMultiCrop([1], [16], [0.14], [1.0])(same)
    flat = crops.flatten(1)
    distinct = {tuple(row.tolist()) for row in flat.round(decimals=4)}
    assert len(distinct) == 64  # shared parameters (transforms.v2 on a batch) would give 1


@pytest.mark.slow  # torch.compile generates and builds C++ kernels: about 20 s on 2 cores
def test_compiled_augmentation_gives_the_same_crops():
    """Compiled by warm_up (set-up time: no compiling in the first steps) for batches of 8
    images of any size (the compiled functions see the crops alone), and the same crops as the
    eager transform's, which was never warmed (warm_up draws from its own generator)."""
    from torch._dynamo.utils import counters

    images = colourful(8)
    args = ([2], [24], [0.14], [1.0])  # every operation, blur and solarization included
    eager = BatchMultiCrop(*args, seed=5, solarize_prob=0.5)
    fused = BatchMultiCrop(*args, seed=5, solarize_prob=0.5, compile=True)
    fused.warm_up((8, 1, 40, 40), images.device)  # the images: 8 x 3 x 32 x 32
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2  # the crop boxes and the augmentation
    for _ in range(2):
        for a, b in zip(eager(images), fused(images)):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled after the warm-up
    BatchMultiCrop(*args).warm_up(images.shape, images.device)  # eager: nothing to do
    assert counters["stats"]["unique_graphs"] == graphs


def test_rejects_what_is_not_a_uint8_batch():
    aug = BatchMultiCrop([1], [8], [0.5], [1.0])
    with pytest.raises(TypeError, match="images: expected uint8"):
        aug(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="nmb_crops"):
        BatchMultiCrop([1, 2], [8], [0.5], [1.0])


# -- random resized crop: torchvision's distribution -------------------------------------------

def _torchvision_boxes(h: int, w: int, scale, n: int) -> np.ndarray:
    torch.manual_seed(0)
    img = torch.zeros(1, h, w)
    out = []
    for _ in range(n):
        i, j, ch, cw = T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])
        out.append((j, i, j + cw, i + ch))
    return np.array(out, dtype=np.float64)


@pytest.mark.parametrize("h, w, scale", [(32, 32, (0.14, 1.0)), (32, 32, (0.05, 0.14)),
                                         (20, 80, (0.5, 1.0))])
def test_crop_boxes_follow_torchvision_random_resized_crop(h, w, scale):
    n = 4000
    ours = crop_boxes(torch.full((n,), h), torch.full((n,), w), scale,
                      torch.Generator().manual_seed(1)).double().numpy()
    ref = _torchvision_boxes(h, w, scale, n)
    for boxes in (ours, ref):  # integer boxes inside the image
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        np.testing.assert_array_equal(boxes, np.round(boxes))

    def stats(b):
        bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        cx = (b[:, 0] + b[:, 2]) / 2 / w
        return np.array([(bw * bh / (h * w)).mean(), np.log(bw / bh).mean(),
                         np.log(bw / bh).std(), cx.mean(), cx.std()])

    # Sample means of 4000 draws: standard errors are below 0.006 for every statistic.
    np.testing.assert_allclose(stats(ours), stats(ref), atol=0.025)


def test_when_no_attempt_fits_the_fallback_is_torchvision_s_centred_crop():
    # A 4:1 strip with scale 1: no box of aspect in [3/4, 4/3] covers it; centred 4/3 crop.
    boxes = crop_boxes(torch.tensor([10]), torch.tensor([40]), (1.0, 1.0),
                       torch.Generator().manual_seed(0))
    i, j, ch, cw = T.RandomResizedCrop.get_params(torch.zeros(1, 10, 40), [1.0, 1.0],
                                                  [3 / 4, 4 / 3])
    assert boxes[0].tolist() == [j, i, j + cw, i + ch]


def test_padded_images_are_cropped_inside_their_own_size():
    canvas = torch.zeros(8, 3, 40, 40, dtype=torch.uint8)
    # Each image is 20x30 of white, its edge replicated by one pixel (as collate_uint8 pads:
    # bilinear sampling at the border reads half a pixel beyond), zeros beyond that.
    canvas[:, :, :21, :31] = 255
    sizes = torch.tensor([[20, 30]] * 8)
    (crops,) = BatchMultiCrop([4], [12], [0.05], [1.0], **NO_AUG, **IDENTITY)(canvas, sizes)
    assert crops.min() > 0.999  # no padding pixel was sampled


# -- flip, colour, grayscale, blur --------------------------------------------------------------

def test_flip_rate_matches_flip_prob_and_a_flip_mirrors_exactly():
    image = colourful(1)
    aug = BatchMultiCrop([1], [32], [1.0], [1.0], **{**NO_AUG, "flip_prob": 0.5}, **IDENTITY)
    crops = aug(image.expand(2000, -1, -1, -1).contiguous())[0]
    plain, mirrored = image.float().div(255), image.float().div(255).flip(-1)
    is_plain = (crops - plain).abs().flatten(1).amax(1) < 1e-5
    is_mirror = (crops - mirrored).abs().flatten(1).amax(1) < 1e-5
    assert bool((is_plain ^ is_mirror).all())
    assert abs(is_mirror.float().mean().item() - 0.5) < 0.04  # 4 standard errors


TV_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


@pytest.mark.parametrize("op", [0, 1, 2, 3])
def test_each_colour_operation_alone_equals_torchvision_s(op):
    x = colourful(3).float() / 255
    factors = torch.tensor([[0.3, 0.3, 0.3, -0.2], [1.0, 1.0, 1.0, 0.05], [1.7, 1.7, 1.7, 0.2]])
    order = torch.tensor([[op] + [o for o in range(4) if o != op]] * 3)
    only = torch.zeros(3, 4)
    only[:, op] = 1  # the other ops get identity factors (shift 0 for hue)
    f = factors * only + torch.tensor([1.0, 1.0, 1.0, 0.0]) * (1 - only)
    expected = torch.stack([TV_OPS[op](img, float(v)) for img, v in zip(x, factors[:, op])])
    got = apply_color_jitter(x, torch.ones(3, dtype=torch.bool), f, order)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_colour_jitter_applies_each_crop_s_ops_in_its_own_order():
    """All 24 orders, random factors, some crops left alone: torchvision's four functions
    applied one crop at a time in that crop's order give the same pixels."""
    import itertools

    orders = torch.tensor(list(itertools.permutations(range(4))) * 2)
    n = len(orders)
    g = torch.Generator().manual_seed(3)
    x = colourful(n).float() / 255
    factors = torch.cat([0.4 + 1.2 * torch.rand(n, 3, generator=g),
                         0.4 * torch.rand(n, 1, generator=g) - 0.2], dim=1)
    apply = torch.rand(n, generator=g) < 0.8
    expected = []
    for img, f, order, on in zip(x, factors, orders, apply):
        for op in order.tolist() if on else []:
            img = TV_OPS[op](img, float(f[op]))
        expected.append(img)
    got = apply_color_jitter(x, apply, factors, orders)
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=0)
    expected = []  # no hue jitter configured: the linear ops alone, still in each crop's order
    for img, f, order, on in zip(x, factors, orders, apply):
        for op in [o for o in order.tolist() if o != 3] if on else []:
            img = TV_OPS[op](img, float(f[op]))
        expected.append(img)
    torch.testing.assert_close(apply_color_jitter(x, apply, factors, orders, hue=False),
                               torch.stack(expected), atol=1e-5, rtol=0)


def test_hue_rotation_equals_torchvision_s():
    x = colourful(6).float() / 255
    x[3] = (x[3] * 3).round() / 3  # four levels: ties between the largest channels
    x[4] = x[4, :1].expand(3, -1, -1)  # grey: no hue, the value is kept
    x[5, :, :4] = 0.0  # black
    shifts = torch.tensor([-0.5, -0.2, 0.05, 0.2, 0.3, 0.5])
    expected = torch.stack([TF.adjust_hue(img, float(s)) for img, s in zip(x, shifts)])
    torch.testing.assert_close(_adjust_hue(x, shifts), expected, atol=1e-5, rtol=0)


def test_blur_equals_torchvision_gaussian_blur_per_image_sigma():
    x = colourful(2, size=24).float() / 255
    sigmas = torch.tensor([0.3, 1.7])
    expected = torch.stack([TF.gaussian_blur(img, [5, 5], [float(s), float(s)])
                            for img, s in zip(x, sigmas)])
    torch.testing.assert_close(_gaussian_blur(x, sigmas, 5), expected, atol=1e-5, rtol=0)


def test_solarize_rate_matches_its_prob_and_inverts_what_pil_inverts():
    image = colourful(1)
    aug = BatchMultiCrop([1], [32], [1.0], [1.0], **{**NO_AUG, "solarize_prob": 0.3}, **IDENTITY)
    crops = aug(image.expand(2000, -1, -1, -1).contiguous())[0]
    plain = image.float().div(255)
    pil = Image.fromarray(image[0].permute(1, 2, 0).numpy())
    solarized = TF.to_tensor(TF.solarize(pil, 128))[None]  # 255 - v where v >= 128
    assert 0 < int((image >= 128).sum()) < image.numel()  # both kinds of pixel
    is_plain = (crops - plain).abs().flatten(1).amax(1) < 1e-5
    is_solarized = (crops - solarized).abs().flatten(1).amax(1) < 1e-5
    assert bool((is_plain ^ is_solarized).all())
    assert abs(is_solarized.float().mean().item() - 0.3) < 0.041  # 4 standard errors


def test_grayscale_prob_one_gives_equal_channels():
    aug = BatchMultiCrop([2], [16], [0.3], [1.0], **{**NO_AUG, "grayscale_prob": 1.0},
                         **IDENTITY)
    (crops,) = aug(colourful(4))
    torch.testing.assert_close(crops[:, 0], crops[:, 1])
    torch.testing.assert_close(crops[:, 1], crops[:, 2])


def _pil_colour_stats(image: torch.Tensor, n: int) -> torch.Tensor:
    torch.manual_seed(0)
    pil = Image.fromarray(image[0].permute(1, 2, 0).numpy())
    aug = MultiCropTransform([1], [32], [1.0], [1.0], blur_prob=0.0, flip_prob=0.0, **IDENTITY)
    crops = torch.stack([aug(pil)[0] for _ in range(n)])
    return _colour_stats(crops)


def _colour_stats(crops: torch.Tensor) -> torch.Tensor:
    """Per channel: mean of the crops' means, spread of the crops' means, mean of their stds,
    and the share of grey crops."""
    means, stds = crops.mean(dim=(2, 3)), crops.std(dim=(2, 3))
    grey = (crops[:, 0] - crops[:, 1]).abs().flatten(1).amax(1) < 1e-3
    return torch.cat([means.mean(0), means.std(0), stds.mean(0), grey.float().mean()[None]])


def test_colour_distortion_statistics_match_the_pil_path():
    image, n = colourful(1), 1500
    aug = BatchMultiCrop([1], [32], [1.0], [1.0], blur_prob=0.0, flip_prob=0.0, **IDENTITY)
    ours = _colour_stats(aug(image.expand(n, -1, -1, -1).contiguous())[0])
    pil = _pil_colour_stats(image, n)
    # Standard errors over 1500 crops are about 0.005 for these statistics; PIL rounds to uint8.
    torch.testing.assert_close(ours, pil, atol=0.03, rtol=0)
    assert math.isclose(float(ours[-1]), 0.2, abs_tol=0.04)  # grayscale_prob


def test_output_memory_format_is_the_one_asked_for():
    aug = BatchMultiCrop([1], [8], [0.5], [1.0], memory_format=torch.channels_last)
    (crops,) = aug(colourful(2, size=16))
    assert crops.is_contiguous(memory_format=torch.channels_last)
