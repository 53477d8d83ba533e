"""SwAV multi-crop on a batch of uint8 images, on the training device, one random draw per crop.

The same augmentation as :class:`swav.multicrop.MultiCropTransform` (Caron et al., 2020, Sec. 3.2;
facebookresearch/swav ``src/multicropdataset.py``): ``RandomResizedCrop``, horizontal flip, colour
jitter applied with ``color_prob`` in a random order of its four operations, random grayscale,
Gaussian blur, solarization where configured, ``Normalize``.  Here every crop of every image
still draws its own parameters, but all crops of a resolution group are produced together:

* the crop boxes follow ``torchvision``'s ``RandomResizedCrop.get_params`` (10 attempts of a
  log-uniform aspect ratio and uniform area scale, then a centre-crop fallback) and are resampled
  in one :func:`torchvision.ops.roi_align` call per resolution (bilinear, adaptive sampling grid,
  so downscaling averages like an antialiased resize);
* colour operations use per-crop factors (brightness, contrast, saturation as blends, hue as a
  rotation in HSV, the formulas of ``torchvision.transforms.functional``);
* the blur is a per-crop separable Gaussian (grouped convolution, reflect padding);
* solarization inverts the values from ``SOLARIZE_AT / 255`` up (less half a level: the PIL
  path rounds each operation's result to uint8 first).

``torchvision.transforms.v2`` applied to a batch would share one set of parameters across the
batch, which would give SwAV's swapped prediction identical views of different images.

Input: ``uint8`` images ``[B, 3, H, W]`` (optionally ``sizes [B, 2]``, the valid ``(h, w)`` of
each image when a batch of different sizes is padded to one shape; the padding must replicate
each image's last row and column, as :func:`swav.raw_batches.collate_uint8` does, because
bilinear sampling at a crop's border reads up to half a pixel beyond it).  Output: one float tensor
per resolution group, crop-major (rows ``B*i .. B*(i+1)-1`` hold crop ``i`` of every image), the
layout :func:`swav.multicrop.multicrop_collate` gives.  Runs on any device; reproducible for a
given seed on a given device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from swav.multicrop import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SOLARIZE_AT,
    blur_kernel_size,
    check_multicrop_args,
)

__all__ = ["BatchMultiCrop", "CropDraws", "apply_color_jitter", "augment_crops",
           "boxes_from_uniforms", "crop_boxes"]

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
RATIO = (3.0 / 4.0, 4.0 / 3.0)
ATTEMPTS = 10


BOX_DRAWS = 2 * ATTEMPTS + 2  # uniforms per crop box: area and aspect per attempt, then placement
AUG_DRAWS = 13  # uniforms per crop for the rest (BatchMultiCrop._draws), + 1 with solarization
SOLARIZE_FROM = (SOLARIZE_AT - 0.5) / 255  # what rounds to SOLARIZE_AT or more


def crop_boxes(heights: torch.Tensor, widths: torch.Tensor, scale: tuple[float, float],
               gen: torch.Generator, ratio: tuple[float, float] = RATIO) -> torch.Tensor:
    """``RandomResizedCrop`` boxes ``[N, 4]`` as ``(x1, y1, x2, y2)`` pixel edges, one per image
    (:func:`boxes_from_uniforms` of ``BOX_DRAWS`` uniforms per image drawn from ``gen``)."""
    u = torch.rand((heights.shape[0], BOX_DRAWS), generator=gen, device=heights.device)
    return boxes_from_uniforms(heights, widths, u, scale, ratio)


def boxes_from_uniforms(heights: torch.Tensor, widths: torch.Tensor, u: torch.Tensor,
                        scale: tuple[float, float], ratio: tuple[float, float] = RATIO
                        ) -> torch.Tensor:
    """The distribution of ``torchvision``'s ``RandomResizedCrop.get_params`` from uniforms
    ``u [N, BOX_DRAWS]``: up to 10 attempts of area ``U(scale) * h * w`` and aspect
    ``exp(U(log ratio))``, the first that fits is placed uniformly (integer offsets); none fits:
    the largest centred crop within ``ratio``.  No randomness here (``crops.compile`` fuses it).
    """
    h, w = heights.double()[:, None], widths.double()[:, None]
    u = u.double()
    area = h * w * (scale[0] + u[:, :ATTEMPTS] * (scale[1] - scale[0]))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + u[:, ATTEMPTS:2 * ATTEMPTS] * (hi - lo))
    cw = torch.round(torch.sqrt(area * aspect))
    ch = torch.round(torch.sqrt(area / aspect))
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
    h, w = h[:, 0], w[:, 0]
    # Fallback: the whole image, or its largest centred crop of the nearest allowed aspect.
    in_ratio = w / h
    fw = torch.where(in_ratio > ratio[1], torch.round(h * ratio[1]), w)
    fh = torch.where(in_ratio < ratio[0], torch.round(w / ratio[0]), h)
    cw, ch = torch.where(found, cw, fw), torch.where(found, ch, fh)
    place = u[:, 2 * ATTEMPTS:]
    top = torch.where(found, torch.floor(place[:, 0] * (h - ch + 1)), torch.floor((h - ch) / 2))
    left = torch.where(found, torch.floor(place[:, 1] * (w - cw + 1)), torch.floor((w - cw) / 2))
    return torch.stack([left, top, left + cw, top + ch], dim=1).float()


# -- colour, on float images in [0, 1], one factor per crop ------------------------------------

def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=1)
    return (GRAY[0] * r + GRAY[1] * g + GRAY[2] * b).unsqueeze(1)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_hue`` (RGB -> HSV, hue + shift, HSV -> RGB) per crop, in closed form.

    With ``v = max``, ``delta = max - min`` and the hue ``h`` in sixths of a turn, each output
    channel is ``v - delta * clamp(min(k, 4 - k), 0, 1)`` with ``k = (h + n) mod 6`` and
    ``n = 5, 3, 1`` for red, green, blue: the six-sector table of ``hsv_to_rgb`` (``v * s`` is
    ``delta``), without building it.  Grey pixels (``delta = 0``) keep their value, as there.
    """
    r, g, b = x.unbind(dim=1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    delta = maxc - minc
    red_max, green_max = maxc == r, maxc == g
    # Hue in sixths before the shift: (g - b) / delta where red is the maximum, 2 + (b - r) /
    # delta where green is, 4 + (r - g) / delta otherwise (torchvision's order of precedence).
    rise = torch.where(red_max, g - b, torch.where(green_max, b - r, r - g))
    sector = torch.where(red_max, 0.0, torch.where(green_max, 2.0, 4.0))
    h6 = rise / delta.clamp(min=1e-12) + sector + 6.0 * shift.view(-1, 1, 1)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        channels.append(maxc - delta * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(channels, dim=1)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    n, c, h, w = x.shape
    half = kernel // 2
    pos = torch.arange(kernel, device=x.device, dtype=x.dtype) - half
    weights = torch.exp(-0.5 * (pos[None, :] / sigma[:, None]) ** 2)
    weights = (weights / weights.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
    y = F.pad(x.reshape(1, n * c, h, w), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, weights.view(n * c, 1, kernel, 1), groups=n * c)
    y = F.conv2d(y, weights.view(n * c, 1, 1, kernel), groups=n * c)
    return y.view(n, c, h, w)


class _Constants(NamedTuple):
    mean: torch.Tensor  # [1, 3, 1, 1]
    std: torch.Tensor
    factor_low: torch.Tensor  # [4]: brightness, contrast, saturation, hue shift
    factor_span: torch.Tensor


@dataclass
class CropDraws:
    """The random parameters of one resolution group's crops, one row per crop."""

    flip: torch.Tensor  # bool [n]
    jitter: torch.Tensor | None  # bool [n]: colour jitter applied (None: none configured)
    factors: torch.Tensor | None  # [n, 4]: brightness, contrast, saturation, hue shift
    order: torch.Tensor | None  # [n, 4]: each crop's order of the four operations
    gray: torch.Tensor  # bool [n]
    blur: torch.Tensor | None  # bool [n] (None: no blur at this size)
    sigma: torch.Tensor | None  # [n]
    solarize: torch.Tensor | None = None  # bool [n] (None: none configured)


def augment_crops(x: torch.Tensor, draws: CropDraws, mean: torch.Tensor, std: torch.Tensor,
                  blur_kernel: int, hue: bool) -> torch.Tensor:
    """Flip, colour jitter, grayscale, blur, solarize and normalise crops ``[n, 3, s, s]`` in
    [0, 1] with the parameters ``draws``: no randomness here, so that it can be compiled into
    few kernels."""
    x = torch.where(draws.flip.view(-1, 1, 1, 1), x.flip(-1), x)
    if draws.jitter is not None:
        x = apply_color_jitter(x, draws.jitter, draws.factors, draws.order, hue=hue)
    x = torch.where(draws.gray.view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
    if draws.blur is not None:
        blurred = _gaussian_blur(x, draws.sigma, blur_kernel)
        x = torch.where(draws.blur.view(-1, 1, 1, 1), blurred, x)
    if draws.solarize is not None:
        x = torch.where(draws.solarize.view(-1, 1, 1, 1) & (x >= SOLARIZE_FROM), 1.0 - x, x)
    return (x - mean) / std


class BatchMultiCrop:
    """Multi-crop a uint8 batch on its device; the arguments of :class:`MultiCropTransform`.

    ``seed`` seeds a generator on the device of the first batch; :meth:`reseed` restarts it (the
    epoch loop does so per epoch, so a resumed run draws the same crops).  Each resolution group
    draws all its random numbers in one call, then computes from them without randomness:
    :func:`boxes_from_uniforms`, ``roi_align``, :func:`augment_crops`.  ``compile``: run the two
    functions through ``torch.compile`` (the same crops, fused into few kernels; compiled once per
    crop size on first use).
    """

    def __init__(self, nmb_crops: Sequence[int], size_crops: Sequence[int],
                 min_scale_crops: Sequence[float], max_scale_crops: Sequence[float],
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 color_strength: float = 1.0, color_prob: float = 0.8,
                 grayscale_prob: float = 0.2, blur_prob: float = 0.5, flip_prob: float = 0.5,
                 solarize_prob: float = 0.0, seed: int = 0,
                 memory_format: torch.memory_format = torch.contiguous_format,
                 compile: bool = False) -> None:
        check_multicrop_args(nmb_crops, size_crops, min_scale_crops, max_scale_crops, mean, std,
                             color_strength, color_prob=color_prob,
                             grayscale_prob=grayscale_prob, blur_prob=blur_prob,
                             flip_prob=flip_prob, solarize_prob=solarize_prob)
        self.groups = [(int(n), int(s)) for n, s in zip(nmb_crops, size_crops)]
        self.scales = [(float(lo), float(hi)) for lo, hi in zip(min_scale_crops, max_scale_crops)]
        self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))
        s = float(color_strength)
        self.jitter = (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)  # brightness, contrast, saturation, hue
        self.color_prob, self.grayscale_prob = float(color_prob), float(grayscale_prob)
        self.blur_prob, self.flip_prob = float(blur_prob), float(flip_prob)
        self.solarize_prob = float(solarize_prob)
        # Solarization's uniform only where configured: the other crops' draws stay as they were.
        self._aug_draws = AUG_DRAWS + (self.solarize_prob > 0)
        self.memory_format = memory_format
        self.compiled = bool(compile)
        fuse = (lambda f: torch.compile(f, dynamic=False)) if compile else (lambda f: f)
        self._boxes, self._augment = fuse(boxes_from_uniforms), fuse(augment_crops)
        self._seed = int(seed)
        self._gen: torch.Generator | None = None
        self._stats: dict[torch.device, _Constants] = {}

    @property
    def n_crops(self) -> int:
        return sum(n for n, _ in self.groups)

    def reseed(self, seed: int) -> None:
        self._seed, self._gen = int(seed), None

    def warm_up(self, shape: Sequence[int], device: torch.device) -> None:
        """Compile now (``compile``) for batches of ``B`` images (``shape`` ``[B, C, H, W]``),
        rather than in the first training step: set-up time, not the first epoch's (whose time
        plans a run with a budget, and counts in it). The compiled functions see the crops'
        shapes alone, so any ``H, W`` and ``C`` serve. The crops to come are those of a transform
        never warmed."""
        if not self.compiled:
            return
        kept, self._gen = self._gen, torch.Generator(device=device)
        self(torch.zeros(tuple(shape), dtype=torch.uint8, device=device))
        self._gen = kept

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device)
            self._gen.manual_seed(self._seed)
        return self._gen

    def __call__(self, images: torch.Tensor, sizes: torch.Tensor | None = None
                 ) -> list[torch.Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise TypeError(f"images: expected uint8 [B, 3, H, W], got {images.dtype} "
                            f"{tuple(images.shape)}")
        gen = self._generator(images.device)
        x = images.float().div_(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        b = x.shape[0]
        if sizes is None:  # (no torch.tensor(list, device=...): a host copy waits for the GPU)
            sizes = torch.stack([torch.full((b,), x.shape[2], device=x.device),
                                 torch.full((b,), x.shape[3], device=x.device)], dim=1)
        sizes = sizes.to(x.device)
        consts = self._constants(x.device)
        out = []
        for (count, size), scale in zip(self.groups, self.scales):
            index = torch.arange(b, device=x.device).repeat(count)  # crop-major rows
            # Every random number of the group in one draw: a kernel, not one per parameter.
            u = torch.rand((count * b, BOX_DRAWS + self._aug_draws), generator=gen,
                           device=x.device)
            boxes = self._boxes(sizes[index, 0], sizes[index, 1], u[:, :BOX_DRAWS], scale)
            rois = torch.cat([index[:, None].float(), boxes], dim=1)
            crops = roi_align(x, rois, output_size=(size, size), spatial_scale=1.0,
                              sampling_ratio=-1, aligned=True)
            kernel = blur_kernel_size(size)
            draws = self._draws(u[:, BOX_DRAWS:], kernel, consts)
            crops = self._augment(crops, draws, consts.mean, consts.std, kernel,
                                  self.jitter[3] > 0)
            out.append(crops.contiguous(memory_format=self.memory_format))
        return out

    def _draws(self, v: torch.Tensor, kernel: int, consts: _Constants) -> CropDraws:
        """The group's parameters from its uniforms ``v [n, AUG_DRAWS (+ 1)]`` (columns: flip,
        jitter, four jitter factors, four keys whose ranks are the order of the jitter's
        operations, grayscale, blur, blur sigma (, solarization))."""
        flip = v[:, 0] < self.flip_prob
        jitter = factors = order = None
        if self.color_prob > 0 and any(self.jitter):
            jitter = v[:, 1] < self.color_prob
            factors = torch.addcmul(consts.factor_low, v[:, 2:6], consts.factor_span)
            order = v[:, 6:10].argsort(dim=1)
        gray = v[:, 10] < self.grayscale_prob
        blur = sigma = None
        if self.blur_prob > 0 and kernel > 1:
            blur = v[:, 11] < self.blur_prob
            sigma = 0.1 + 1.9 * v[:, 12]  # U(0.1, 2.0)
        solarize = v[:, AUG_DRAWS] < self.solarize_prob if self.solarize_prob > 0 else None
        return CropDraws(flip, jitter, factors, order, gray, blur, sigma, solarize)

    def _constants(self, device: torch.device) -> _Constants:
        """Normalisation and jitter-range constants, copied to the device once."""
        if device not in self._stats:
            b, c, s, h = self.jitter
            low = [max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h]
            high = [1 + b, 1 + c, 1 + s, h]
            self._stats[device] = _Constants(
                torch.tensor(self.mean, device=device).view(1, 3, 1, 1),
                torch.tensor(self.std, device=device).view(1, 3, 1, 1),
                torch.tensor(low, device=device),
                torch.tensor([hi - lo for lo, hi in zip(low, high)], device=device))
        return self._stats[device]


def _blend_coefficients(ops: torch.Tensor, factors: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For linear ops ``[n, P]`` (brightness 0, contrast 1, saturation 2, none 3) of ``P`` passes:
    each pass's blend factor and the weights of the grey image and of its mean in the image
    blended with, for every pass at once (``[n, P]`` each)."""
    picked = factors[:, :3].gather(1, ops.clamp(max=2))
    f = torch.where(ops < 3, picked, 1.0)  # none: factor 1, the crop itself
    return f, (ops == 2).to(f.dtype), (ops == 1).to(f.dtype)


def _blend(x: torch.Tensor, f: torch.Tensor, grey_weight: torch.Tensor,
           mean_weight: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast or saturation of each crop, in one blend.

    All three blend the image with an "other" image: black, the mean grey level, the grey image
    (torchvision's definitions), i.e. ``grey_weight * grey + mean_weight * mean(grey)`` with
    weights 0/0, 0/1 or 1/0 (exact: the unused term adds zero).
    """
    grey = _gray(x)
    other = (grey * grey_weight.view(-1, 1, 1, 1)
             + grey.mean(dim=(1, 2, 3), keepdim=True) * mean_weight.view(-1, 1, 1, 1))
    return torch.lerp(other, x, f.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)  # f * x + (1 - f) * other


def apply_color_jitter(x: torch.Tensor, apply: torch.Tensor, factors: torch.Tensor,
                       order: torch.Tensor, hue: bool = True) -> torch.Tensor:
    """Colour jitter with per-crop factors [n, 4] (brightness, contrast, saturation, hue shift)
    applied in each crop's own order (a permutation of 0..3 per row), only where ``apply``.

    The hue rotation costs most, so it runs once: the linear ops a crop takes before its hue
    slot run first (one blend per slot), then the hue, then those after it. Equal to applying
    torchvision's four functions per crop in its order. Every pass's coefficients are worked out
    together first, so that a pass is a few kernels.
    """
    none = torch.full_like(order[:, 0], 3)
    order = torch.where(apply[:, None], order, none[:, None])  # op 3 in a slot: nothing linear
    if hue:  # passes 0-2: slots 0-2 before the hue slot; passes 3-5: slots 1-3 after it
        hue_slot = (order == 3).int().argmax(dim=1, keepdim=True)
        slots = torch.arange(4, device=order.device)
        ops = torch.cat([torch.where(slots[:3] < hue_slot, order[:, :3], 3),
                         torch.where(slots[1:] > hue_slot, order[:, 1:], 3)], dim=1)
    else:
        ops = order
    f, grey_weight, mean_weight = _blend_coefficients(ops, factors)
    for p in range(ops.shape[1]):
        if hue and p == 3:
            x = torch.where(apply.view(-1, 1, 1, 1), _adjust_hue(x, factors[:, 3]), x)
        x = _blend(x, f[:, p], grey_weight[:, p], mean_weight[:, p])
    return x
