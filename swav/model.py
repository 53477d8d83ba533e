"""SwAV network: backbone, projection head and prototypes (Caron et al., 2020, Sec. 3 and 4).

``SwAVModel`` maps crops to L2-normalised embeddings ``z`` and to prototype scores ``z . c_k``.
Prototypes are the rows of a bias-free linear layer, re-normalised to unit length before every
step (:meth:`Prototypes.normalize_`); several heads with different ``K`` are supported as in the
official ``MultiPrototypes``.  Crops of one resolution share one backbone pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

__all__ = [
    "BACKBONES",
    "ConvNet",
    "ProjectionHead",
    "Prototypes",
    "SwAVModel",
    "build_backbone",
    "build_model",
]

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2")
BACKBONES = ("convnet", *RESNETS)
TIMM = "timm/"  # backbone: timm/<name>, e.g. timm/resnet50, timm/convnext_tiny, timm/vit_small_patch16_224


class ConvNet(nn.Module):
    """Small VGG-style encoder for fast CPU runs: ``depth`` blocks of conv-BN-ReLU (+ 2x2 pool).

    Widths double every block from ``width``; the last block is globally average-pooled, so any
    input size >= 2**(depth-1) works.  Output dimension: ``width * 2**(depth-1)``.
    """

    def __init__(self, in_channels: int = 3, width: int = 32, depth: int = 3) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width: must be >= 1, got {width}")
        if depth < 1:
            raise ValueError(f"depth: must be >= 1, got {depth}")
        layers: list[nn.Module] = []
        channels = in_channels
        for block in range(depth):
            out = width * 2**block
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            if block < depth - 1:
                layers.append(nn.MaxPool2d(2))
            channels = out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.out_dim = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_backbone(
    name: str, cifar_stem: bool = False, width: int = 32, depth: int = 3
) -> tuple[nn.Module, int]:
    """Backbone by name and its feature dimension (randomly initialised, no downloads).

    ``cifar_stem`` replaces a ResNet's 7x7/2 convolution and max-pool by a 3x3/1 convolution, the
    usual adaptation for 32px images.  ``width``/``depth`` configure ``convnet`` only.
    ``timm/<name>``: any timm model (``pip install timm``) without its classifier.
    """
    if name == "convnet":
        net = ConvNet(width=width, depth=depth)
        return net, net.out_dim
    if name.startswith(TIMM):
        return _timm_backbone(name[len(TIMM):], cifar_stem)
    if name not in RESNETS:
        raise ValueError(f"backbone: unknown backbone {name!r}, expected one of {BACKBONES} "
                         f"or {TIMM}<a timm model>")
    net = getattr(torchvision.models, name)(weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def _timm_backbone(name: str, cifar_stem: bool) -> tuple[nn.Module, int]:
    """A timm model without its classifier (``num_classes=0``: pooled features), and its
    feature dimension as timm reports it. Vision transformers take any crop size
    (``dynamic_img_size``), as multi-crop needs."""
    try:
        import timm
    except ImportError:
        raise ValueError(f"backbone: {TIMM}{name} needs timm (pip install -e '.[timm]')") from None
    if cifar_stem:
        raise ValueError("cifar_stem: adapts torchvision's ResNets only, not timm models")
    if not timm.is_model(name):
        raise ValueError(f"backbone: timm has no model {name!r} (timm.list_models() lists them)")
    try:
        net = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True)
    except TypeError:  # (a model without that option: CNNs take any size anyway)
        net = timm.create_model(name, pretrained=False, num_classes=0)
    return net, int(net.num_features)


class ProjectionHead(nn.Module):
    """Linear-BN-ReLU-Linear MLP (a single Linear when ``hidden_dim`` is 0), L2-normalised output."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> None:
        super().__init__()
        if hidden_dim < 0:
            raise ValueError(f"hidden_dim: must be >= 0, got {hidden_dim}")
        if out_dim < 1:
            raise ValueError(f"out_dim: must be >= 1, got {out_dim}")
        if hidden_dim == 0:
            self.net: nn.Module = nn.Linear(in_dim, out_dim)
        else:
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden_dim),
                nn.BatchNorm1d(hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, out_dim),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)


class Prototypes(nn.Module):
    """One or several sets of prototypes, each a ``Linear(dim, K, bias=False)``."""

    def __init__(self, dim: int, n_prototypes: int | Sequence[int]) -> None:
        super().__init__()
        ks = [n_prototypes] if isinstance(n_prototypes, int) else list(n_prototypes)
        if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
            raise ValueError(f"n_prototypes: every K must be an int >= 1, got {n_prototypes}")
        self.heads = nn.ModuleList(nn.Linear(dim, k, bias=False) for k in ks)
        self.normalize_()

    @property
    def sizes(self) -> list[int]:
        return [head.out_features for head in self.heads]

    @torch.no_grad()
    def normalize_(self) -> None:
        """Project every prototype back onto the unit sphere (done before every training step)."""
        for head in self.heads:
            head.weight.copy_(F.normalize(head.weight, dim=1))

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        return [head(z) for head in self.heads]


class SwAVModel(nn.Module):
    """Backbone + projection head + prototypes.

    ``forward`` takes the crops grouped by resolution (a list of ``[n_g * B, C, H, W]`` tensors,
    crop-major) and returns ``(embeddings [N, D], scores)`` where ``scores`` is one ``[N, K_h]``
    tensor per prototype head, rows in the same crop-major order.
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, head: ProjectionHead,
                 prototypes: Prototypes) -> None:
        super().__init__()
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.projection_head = head
        self.prototypes = prototypes

    def forward(
        self, crops: torch.Tensor | Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        groups = [crops] if isinstance(crops, torch.Tensor) else list(crops)
        features = torch.cat([self.backbone(g) for g in groups])
        z = self.projection_head(features)
        return z, self.prototypes(z)


def build_model(
    backbone: str = "convnet",
    cifar_stem: bool = False,
    width: int = 32,
    depth: int = 3,
    hidden_dim: int = 2048,
    out_dim: int = 128,
    n_prototypes: int | Sequence[int] = 3000,
) -> SwAVModel:
    """A SwAV model from plain settings (the fields of the ``model`` config section)."""
    net, dim = build_backbone(backbone, cifar_stem=cifar_stem, width=width, depth=depth)
    return SwAVModel(net, dim, ProjectionHead(dim, hidden_dim, out_dim),
                     Prototypes(out_dim, n_prototypes))
