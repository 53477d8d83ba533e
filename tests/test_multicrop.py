"""Tests for swav.multicrop: multi-crop augmentation and crop-major collation."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from sklearn.datasets import load_digits

from swav.multicrop import MultiCropTransform, blur_kernel_size, multicrop_collate

NO_AUG: dict[str, float] = dict(color_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, flip_prob=0.0)
IDENTITY_NORM: dict[str, Any] = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def digits_uint8() -> np.ndarray:
    """sklearn 8x8 digits (values 0..16) scaled to uint8 0..255, shape [N, 8, 8]."""
    images = load_digits().images[:8]
    return np.round(images * (255.0 / 16.0)).astype(np.uint8)


@pytest.fixture(scope="module")
def digit_rgb(digits_uint8: np.ndarray) -> Image.Image:
    """One digit upsampled to 32x32 RGB with a coloured tint so that channels differ."""
    gray = Image.fromarray(digits_uint8[0]).resize((32, 32), Image.BILINEAR)
    arr = np.asarray(gray, dtype=np.float64)
    rgb = np.stack([arr, 0.5 * arr + 60, 255 - arr], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def asymmetric_image(size: int = 16) -> Image.Image:
    """Left half red, right half blue, plus a green square: not mirror-symmetric."""
    img = Image.new("RGB", (size, size), (0, 0, 255))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, size // 2 - 1, size - 1], fill=(255, 0, 0))
    draw.rectangle([1, 1, 4, 4], fill=(0, 255, 0))
    return img


def unnormalise(crop: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    return crop * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)


# --------------------------------------------------------------------------- transform: layout


def test_crop_count_shapes_and_group_order(digit_rgb: Image.Image) -> None:
    t = MultiCropTransform([2, 3], [16, 8], [0.3, 0.05], [1.0, 0.3])
    assert t.n_crops == 5
    assert t.groups == [(2, 16), (3, 8)]
    crops = t(digit_rgb)
    assert isinstance(crops, list) and len(crops) == 5
    assert [tuple(c.shape) for c in crops] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 3
    assert all(c.dtype == torch.float32 for c in crops)


def test_small_group_first_keeps_given_order(digit_rgb: Image.Image) -> None:
    t = MultiCropTransform([1, 2, 1], [6, 12, 4], [0.1, 0.5, 0.1], [0.5, 1.0, 0.3])
    assert t.n_crops == 4
    assert t.groups == [(1, 6), (2, 12), (1, 4)]
    assert [c.shape[-1] for c in t(digit_rgb)] == [6, 12, 12, 4]


def test_groups_property_is_a_copy() -> None:
    t = MultiCropTransform([2], [8], [0.5], [1.0])
    t.groups.append((9, 9))
    assert t.groups == [(2, 8)]
    assert t.n_crops == 2


def test_tiny_crops_work_with_blur() -> None:
    img = asymmetric_image(16)
    t = MultiCropTransform([2, 2], [2, 1], [0.5, 0.5], [1.0, 1.0], blur_prob=1.0)
    assert [tuple(c.shape) for c in t(img)] == [(3, 2, 2)] * 2 + [(3, 1, 1)] * 2


@pytest.mark.parametrize(
    ("size", "kernel"), [(1, 1), (2, 1), (3, 3), (16, 3), (32, 3), (50, 5), (96, 9), (224, 23)]
)
def test_blur_kernel_is_odd_and_about_ten_percent(size: int, kernel: int) -> None:
    assert blur_kernel_size(size) == kernel


# --------------------------------------------------------------------------- transform: values


@pytest.mark.parametrize(
    ("mean", "std"),
    [((0.485, 0.456, 0.406), (0.228, 0.224, 0.225)), ((0.5, 0.25, 0.0), (0.25, 0.5, 2.0))],
)
def test_constant_image_is_normalised_per_channel(mean: tuple, std: tuple) -> None:
    colour = (200, 100, 50)
    img = Image.new("RGB", (20, 20), colour)
    t = MultiCropTransform([2, 1], [12, 5], [1.0, 1.0], [1.0, 1.0], mean=mean, std=std, **NO_AUG)
    expected = torch.tensor([(v / 255.0 - m) / s for v, m, s in zip(colour, mean, std)])
    for crop in t(img):
        target = expected.view(3, 1, 1).expand_as(crop)
        torch.testing.assert_close(crop, target, atol=1e-5, rtol=0)


def test_no_augmentation_full_scale_crop_is_the_image() -> None:
    img = asymmetric_image(16)
    t = MultiCropTransform([1], [16], [1.0], [1.0], **IDENTITY_NORM, **NO_AUG)
    crop = t(img)[0]
    expected = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255.0
    torch.testing.assert_close(crop, expected, atol=1e-6, rtol=0)


def test_solarize_prob_one_inverts_the_bright_values() -> None:
    img = asymmetric_image(16)
    crop = MultiCropTransform([1], [16], [1.0], [1.0], **IDENTITY_NORM,
                              **{**NO_AUG, "solarize_prob": 1.0})(img)[0]
    values = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()
    assert 0 < int((values >= 128).sum()) < values.numel()  # both kinds of pixel
    expected = torch.where(values >= 128, 255 - values, values) / 255.0
    torch.testing.assert_close(crop, expected, atol=1e-6, rtol=0)


def test_flip_prob_one_mirrors_the_crop() -> None:
    img = asymmetric_image(16)
    plain = MultiCropTransform([1], [16], [1.0], [1.0], **NO_AUG)(img)[0]
    flipped = MultiCropTransform([1], [16], [1.0], [1.0], **{**NO_AUG, "flip_prob": 1.0})(img)[0]
    assert not torch.equal(plain, flipped)
    torch.testing.assert_close(flipped, torch.flip(plain, dims=[-1]))


def test_grayscale_prob_one_makes_channels_equal(digit_rgb: Image.Image) -> None:
    mean, std = (0.485, 0.456, 0.406), (0.228, 0.224, 0.225)
    kwargs = {**NO_AUG, "grayscale_prob": 1.0}
    t = MultiCropTransform([3], [16], [0.3], [1.0], mean=mean, std=std, **kwargs)
    for crop in t(digit_rgb):
        raw = unnormalise(crop, mean, std)
        torch.testing.assert_close(raw[0], raw[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(raw[0], raw[2], atol=1e-5, rtol=0)
    # Without grayscale the tinted digit's channels differ.
    colour = MultiCropTransform([1], [16], [1.0], [1.0], mean=mean, std=std, **NO_AUG)
    raw = unnormalise(colour(digit_rgb)[0], mean, std)
    assert (raw[0] - raw[2]).abs().max() > 0.5


def test_color_jitter_changes_colours_only_when_enabled(digit_rgb: Image.Image) -> None:
    base = MultiCropTransform([4], [16], [1.0], [1.0], **IDENTITY_NORM, **NO_AUG)
    jitter = MultiCropTransform(
        [4], [16], [1.0], [1.0], **IDENTITY_NORM, **{**NO_AUG, "color_prob": 1.0}
    )
    zero_strength = MultiCropTransform(
        [4], [16], [1.0], [1.0], color_strength=0.0, **IDENTITY_NORM, **{**NO_AUG, "color_prob": 1.0}
    )
    torch.manual_seed(0)
    reference = base(digit_rgb)
    torch.manual_seed(0)
    jittered = jitter(digit_rgb)
    torch.manual_seed(0)
    unchanged = zero_strength(digit_rgb)
    for ref, jit, same in zip(reference, jittered, unchanged):
        assert (ref - jit).abs().mean() > 0.01
        torch.testing.assert_close(same, ref, atol=1e-6, rtol=0)
    assert all(0.0 <= c.min() and c.max() <= 1.0 for c in jittered)


def test_blur_smooths_a_checkerboard() -> None:
    board = (np.indices((32, 32)).sum(axis=0) % 2 * 255).astype(np.uint8)
    img = Image.fromarray(board)
    sharp = MultiCropTransform([1], [32], [1.0], [1.0], **IDENTITY_NORM, **NO_AUG)(img)[0]
    blur = MultiCropTransform(
        [8], [32], [1.0], [1.0], **IDENTITY_NORM, **{**NO_AUG, "blur_prob": 1.0}
    )
    torch.manual_seed(0)
    blurred = blur(img)
    sharp_std = sharp.std().item()
    assert sharp_std > 0.45
    stds = [c.std().item() for c in blurred]
    assert all(s <= sharp_std + 1e-6 for s in stds)
    assert min(stds) < 0.5 * sharp_std  # sigma up to 2 on a 3-px kernel flattens a checkerboard


# --------------------------------------------------------------------------- transform: inputs


def test_array_tensor_and_pil_inputs_agree(digits_uint8: np.ndarray) -> None:
    gray = np.ascontiguousarray(np.kron(digits_uint8[1], np.ones((3, 3), dtype=np.uint8)))
    rgb = np.stack([gray, 255 - gray, gray // 2], axis=-1)
    t = MultiCropTransform([2, 2], [12, 6], [0.2, 0.05], [1.0, 0.3])
    cases: list[tuple[Any, Any]] = [
        (gray, Image.fromarray(gray)),
        (gray[:, :, None], Image.fromarray(gray)),
        (rgb, Image.fromarray(rgb)),
        (torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), Image.fromarray(rgb)),
        (torch.from_numpy(gray)[None], Image.fromarray(gray)),
        (Image.fromarray(rgb).convert("RGBA"), Image.fromarray(rgb)),
    ]
    for raw, pil in cases:
        torch.manual_seed(3)
        got = t(raw)
        torch.manual_seed(3)
        want = t(pil.convert("RGB"))
        assert len(got) == 4
        for g, w in zip(got, want):
            assert g.shape[0] == 3
            assert torch.equal(g, w)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((8, 8), dtype=np.float32),
        np.zeros((2, 8, 8, 3), dtype=np.uint8),
        torch.zeros(3, 8, 8),
        torch.zeros(8, 8, dtype=torch.uint8),
        "not an image",
    ],
    ids=["float-array", "4d-array", "float-tensor", "2d-tensor", "str"],
)
def test_unsupported_inputs_raise_type_error(bad: Any) -> None:
    t = MultiCropTransform([1], [8], [0.5], [1.0])
    with pytest.raises(TypeError, match=r"^img:"):
        t(bad)


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_crops_different_seed_different_crops(digit_rgb: Image.Image) -> None:
    t = MultiCropTransform([2, 3], [16, 8], [0.14, 0.05], [1.0, 0.14])
    torch.manual_seed(123)
    first = t(digit_rgb)
    torch.manual_seed(123)
    second = t(digit_rgb)
    torch.manual_seed(124)
    third = t(digit_rgb)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert sum(not torch.equal(a, c) for a, c in zip(first, third)) >= 4


def test_crops_of_one_image_differ(digit_rgb: Image.Image) -> None:
    t = MultiCropTransform([4], [16], [0.14], [1.0])
    torch.manual_seed(0)
    crops = t(digit_rgb)
    for i in range(len(crops)):
        for j in range(i + 1, len(crops)):
            assert not torch.equal(crops[i], crops[j])


def test_pickled_transform_behaves_identically(digit_rgb: Image.Image) -> None:
    t = MultiCropTransform([2, 2], [16, 8], [0.14, 0.05], [1.0, 0.14])
    clone = pickle.loads(pickle.dumps(t))
    assert clone.groups == t.groups and clone.n_crops == t.n_crops
    torch.manual_seed(7)
    a = t(digit_rgb)
    torch.manual_seed(7)
    b = clone(digit_rgb)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- collate


def constant_crops(b: int, sizes: list[int]) -> list[torch.Tensor]:
    """Crops of image ``b``: crop ``i`` is filled with ``100*b + i``."""
    return [torch.full((3, s, s), float(100 * b + i)) for i, s in enumerate(sizes)]


def test_collate_is_crop_major() -> None:
    sizes, batch_size = [16, 16, 8, 8, 8], 4
    batch = [constant_crops(b, sizes) for b in range(batch_size)]
    groups, labels = multicrop_collate(batch)
    assert labels is None
    assert [tuple(g.shape) for g in groups] == [(8, 3, 16, 16), (12, 3, 8, 8)]
    for g in groups:  # every row is one whole crop
        assert torch.equal(g, g[:, :1, :1, :1].expand_as(g))
    rows = torch.cat([g[:, 0, 0, 0] for g in groups])
    expected = [100 * b + crop for crop in range(len(sizes)) for b in range(batch_size)]
    assert rows.tolist() == expected
    for crop in range(len(sizes)):  # rows b*crop .. b*(crop+1)-1 are crop `crop` of every image
        chunk = rows[batch_size * crop : batch_size * (crop + 1)]
        assert chunk.tolist() == [100 * b + crop for b in range(batch_size)]


def test_collate_groups_only_consecutive_equal_sizes() -> None:
    batch = [constant_crops(b, [8, 4, 4, 8]) for b in range(3)]
    groups, _ = multicrop_collate(batch)
    assert [tuple(g.shape) for g in groups] == [(3, 3, 8, 8), (6, 3, 4, 4), (3, 3, 8, 8)]
    assert groups[2][:, 0, 0, 0].tolist() == [3.0, 103.0, 203.0]


def test_collate_int_labels() -> None:
    batch = [(constant_crops(b, [8, 4]), label) for b, label in enumerate([7, 0, 3])]
    groups, labels = multicrop_collate(batch)
    assert labels is not None
    assert labels.dtype == torch.long
    assert labels.tolist() == [7, 0, 3]
    assert groups[0][:, 0, 0, 0].tolist() == [0.0, 100.0, 200.0]
    assert groups[1][:, 0, 0, 0].tolist() == [1.0, 101.0, 201.0]


def test_collate_accepts_numpy_and_tensor_int_labels() -> None:
    batch = [
        (constant_crops(0, [4]), np.int64(5)),
        (constant_crops(1, [4]), torch.tensor(2)),
        (tuple(constant_crops(2, [4])), 9),
    ]
    _, labels = multicrop_collate(batch)
    assert labels is not None and labels.tolist() == [5, 2, 9]


@pytest.mark.parametrize("labels", [[1, None, 2], [None, None, None], [1, "cat", 2], [1, 2.5, 2]])
def test_collate_labels_none_unless_all_int(labels: list) -> None:
    batch = [(constant_crops(b, [8, 4]), lab) for b, lab in enumerate(labels)]
    groups, out = multicrop_collate(batch)
    assert out is None
    assert [tuple(g.shape) for g in groups] == [(3, 3, 8, 8), (3, 3, 4, 4)]


def test_collate_rejects_different_crop_counts() -> None:
    batch = [constant_crops(0, [8, 4, 4]), constant_crops(1, [8, 4])]
    with pytest.raises(ValueError, match="crops"):
        multicrop_collate(batch)


def test_collate_rejects_mismatched_crop_shapes() -> None:
    batch = [constant_crops(0, [8, 4]), constant_crops(1, [8, 6])]
    with pytest.raises(ValueError, match="shape"):
        multicrop_collate(batch)


def test_collate_rejects_empty_batch() -> None:
    with pytest.raises(ValueError, match="empty"):
        multicrop_collate([])


def test_transform_then_collate_end_to_end(digits_uint8: np.ndarray) -> None:
    t = MultiCropTransform([2, 3], [16, 8], [0.14, 0.05], [1.0, 0.14])
    torch.manual_seed(0)
    samples = [(t(img), int(i)) for i, img in enumerate(digits_uint8[:4])]
    groups, labels = multicrop_collate(samples)
    assert [tuple(g.shape) for g in groups] == [(8, 3, 16, 16), (12, 3, 8, 8)]
    assert labels is not None and labels.tolist() == [0, 1, 2, 3]
    # Row b + B*i of the small-crop group is crop 2+i of image b.
    for b, (crops, _) in enumerate(samples):
        assert torch.equal(groups[0][b + 4], crops[1])
        assert torch.equal(groups[1][b + 4 * 2], crops[4])


# --------------------------------------------------------------------------- validation

VALID: dict[str, Any] = dict(
    nmb_crops=[2, 3], size_crops=[16, 8], min_scale_crops=[0.14, 0.05], max_scale_crops=[1.0, 0.14]
)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"nmb_crops": []}, "nmb_crops"),
        ({"size_crops": [16]}, "size_crops"),
        ({"min_scale_crops": [0.1, 0.1, 0.1]}, "min_scale_crops"),
        ({"max_scale_crops": [1.0]}, "max_scale_crops"),
        ({"nmb_crops": [2, 0]}, "nmb_crops"),
        ({"nmb_crops": [2, 1.5]}, "nmb_crops"),
        ({"nmb_crops": [True, 2]}, "nmb_crops"),
        ({"size_crops": [16, 0]}, "size_crops"),
        ({"size_crops": [16, 8.0]}, "size_crops"),
        ({"min_scale_crops": [0.0, 0.05]}, "min_scale_crops"),
        ({"min_scale_crops": [-0.1, 0.05]}, "min_scale_crops"),
        ({"min_scale_crops": [0.14, float("nan")]}, "min_scale_crops"),
        ({"max_scale_crops": [1.5, 0.14]}, "max_scale_crops"),
        ({"max_scale_crops": [1.0, 0.0]}, "max_scale_crops"),
        ({"min_scale_crops": [0.5, 0.05], "max_scale_crops": [0.4, 0.14]}, "min_scale_crops"),
        ({"color_prob": 1.5}, "color_prob"),
        ({"color_prob": float("nan")}, "color_prob"),
        ({"grayscale_prob": -0.1}, "grayscale_prob"),
        ({"blur_prob": 2.0}, "blur_prob"),
        ({"flip_prob": -1.0}, "flip_prob"),
        ({"solarize_prob": 1.5}, "solarize_prob"),
        ({"color_strength": -0.5}, "color_strength"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.2, 0.2, 0.2, 0.2)}, "std"),
        ({"std": (0.2, 0.0, 0.2)}, "std"),
        ({"std": (0.2, -0.1, 0.2)}, "std"),
    ],
)
def test_validation_error_names_field(override: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}:"):
        MultiCropTransform(**{**VALID, **override})


def test_length_mismatch_message() -> None:
    with pytest.raises(ValueError) as info:
        MultiCropTransform(**{**VALID, "size_crops": [16]})
    assert str(info.value) == "size_crops: has 1 entries but nmb_crops has 2"


def test_boundary_values_are_accepted() -> None:
    t = MultiCropTransform(
        [1],
        [1],
        [1.0],
        [1.0],
        color_strength=0.0,
        color_prob=1.0,
        grayscale_prob=0.0,
        blur_prob=1.0,
        flip_prob=0.0,
    )
    assert t.groups == [(1, 1)]
    assert [tuple(c.shape) for c in t(asymmetric_image(4))] == [(3, 1, 1)]
