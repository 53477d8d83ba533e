"""The peer loops the GPU benches compare with, built from lightly's own SwaV pieces.

lightly (https://github.com/lightly-ai/lightly, the ``bench`` extra) is imported only here.  Two
things are built from its ``SwaVProjectionHead``, ``SwaVPrototypes``, ``SwaVLoss`` and
``SwaVTransform``:

* :func:`grouped_step`: a plain training step with the same backbone, crops, precision and memory
  format as ours, one backbone pass per resolution group (the fast way to use lightly's parts;
  lightly's example passes every crop through the backbone separately);
* :func:`published_cifar10`: lightly's published CIFAR-10 SwaV benchmark recipe
  (``SwaVModel`` in lightly's ``docs/source/getting_started/benchmarks/cifar10_benchmark.py``,
  kNN 0.842 at batch 512 after 200 epochs): lightly's CIFAR ResNet-18 (``ResNetGenerator``, 3x3
  stem, used as ``Sequential(*children[:-1], AdaptiveAvgPool2d(1))`` as there), projection
  512-512-128, 512 prototypes (not frozen), ``SwaVLoss`` defaults, 2x32 crops of
  ``SwaVTransform`` (min scale 0.14, colour-jitter strength 0.5, no blur), each crop through the
  model on its own, Adam 1e-3 x batch/128 with weight decay 1e-6, cosine schedule over 200
  epochs; trained for a wall-clock budget.  lightly trains it in fp32; here the backbone runs
  under bf16 autocast on CUDA (channels-last), the projection head, prototypes and loss in fp32.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from swav.model import build_backbone


def _lightly():
    from lightly.loss import SwaVLoss
    from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
    return SwaVLoss, SwaVProjectionHead, SwaVPrototypes


#: lightly's own CIFAR ResNet-18, the backbone of its CIFAR-10 benchmarks (``LightlySwaV``).
LIGHTLY_RESNET18 = "lightly-resnet-18"


def _lightly_resnet18() -> tuple[nn.Module, int]:
    """``ResNetGenerator("resnet-18")`` without its classifier, as lightly's CIFAR-10 benchmark
    builds it (``Sequential(*children[:-1], AdaptiveAvgPool2d(1))``: the stem's ReLU, a
    functional call in ``ResNet.forward``, is not among the children), flattened to [N, 512]."""
    from lightly.models import ResNetGenerator

    resnet = ResNetGenerator("resnet-18")
    return nn.Sequential(*list(resnet.children())[:-1], nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(1)), resnet.linear.in_features


class LightlySwaV(nn.Module):
    """A backbone (torchvision's ResNet as ours uses it, optionally with the 3x3 CIFAR stem, or
    :data:`LIGHTLY_RESNET18`) + lightly's projection head and prototypes."""

    def __init__(self, backbone: str = "resnet18", cifar_stem: bool = False,
                 hidden_dim: int = 2048, out_dim: int = 128, prototypes: int = 3000,
                 frozen_epochs: int = 0) -> None:
        super().__init__()
        _, head, protos = _lightly()
        if backbone == LIGHTLY_RESNET18:
            self.backbone, dim = _lightly_resnet18()
        else:
            self.backbone, dim = build_backbone(backbone, cifar_stem=cifar_stem)
        self.projection_head = head(dim, hidden_dim, out_dim)
        self.prototypes = protos(out_dim, prototypes, n_steps_frozen_prototypes=frozen_epochs)

    def forward(self, groups: Sequence[torch.Tensor], epoch: int | None = None) -> torch.Tensor:
        features = torch.cat([self.backbone(g) for g in groups])
        z = nn.functional.normalize(self.projection_head(features), dim=1, p=2)
        return self.prototypes(z, epoch)  # lightly freezes the prototypes while epoch < frozen


def grouped_step(backbone: str, cifar_stem: bool, prototypes: int, counts: Sequence[int],
                 lr: float, device: torch.device, channels_last: bool = True
                 ) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """A lightly SwaV step, one backbone pass per resolution group, bf16 autocast, SGD."""
    swav_loss, _, _ = _lightly()
    model = LightlySwaV(backbone, cifar_stem, prototypes=prototypes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = swav_loss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-6)
    n_high = counts[0]

    def step(groups: list[torch.Tensor]) -> torch.Tensor:
        model.prototypes.normalize()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            scores = model(groups)
        per_crop = scores.float().chunk(sum(counts))
        loss = criterion(list(per_crop[:n_high]), list(per_crop[n_high:]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def _stack_views(samples: list) -> list[torch.Tensor]:
    return [torch.stack(views) for views in zip(*samples)]


def _published_loader(images: torch.Tensor, batch_size: int, workers: int,
                      device: torch.device):
    """lightly's CIFAR-10 views of ``images``: two 32 px crops of ``SwaVTransform`` (PIL, in
    ``workers`` loader processes), shuffled, whole batches."""
    from lightly.transforms.swav_transform import SwaVTransform
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    transform = SwaVTransform(crop_sizes=(32,), crop_counts=(2,), crop_min_scales=(0.14,),
                              crop_max_scales=(1.0,), cj_strength=0.5, gaussian_blur=0.0)

    class Views(Dataset):
        def __len__(self) -> int:
            return len(images)

        def __getitem__(self, i: int):
            return transform(Image.fromarray(images[i].permute(1, 2, 0).numpy()))

    return DataLoader(Views(), batch_size=batch_size, shuffle=True, drop_last=True,
                      num_workers=workers, persistent_workers=workers > 0,
                      pin_memory=device.type == "cuda", collate_fn=_stack_views)


def published_cifar10(images: torch.Tensor, budget_s: float, device: torch.device,
                      batch_size: int = 512, workers: int = 15,
                      marks: Sequence[float] = (), on_mark: Callable | None = None,
                      seed: int = 0, stats: dict | None = None,
                      schedule_epochs: int | None = 200) -> nn.Module:
    """lightly's CIFAR-10 SwaV recipe on ``images`` (uint8 ``[N, 3, 32, 32]``) for ``budget_s``
    seconds of training.  The cosine schedule runs over ``schedule_epochs`` epochs as published
    (200, stepped once per epoch: the rate is still near its peak when the budget ends), or over
    the budget (None).  ``on_mark(seconds, backbone)`` is called (clock paused) when the training
    time passes each of ``marks``; ``stats`` receives the epochs, images and images/s trained and
    the mean SwaV loss of the last epoch begun (``loss``; ln 512 = 6.24 is the collapsed value)."""
    swav_loss, _, _ = _lightly()
    torch.manual_seed(seed)
    loader = _published_loader(images, batch_size, workers, device)
    model = LightlySwaV(LIGHTLY_RESNET18, hidden_dim=512, prototypes=512).to(device)
    model = model.to(memory_format=torch.channels_last)
    criterion = swav_loss()
    base_lr = 1e-3 * batch_size / 128
    optimizer = torch.optim.Adam(model.parameters(), lr=base_lr, weight_decay=1e-6)
    amp = device.type == "cuda"

    def scores(crop: torch.Tensor) -> torch.Tensor:  # lightly's SwaVModel.forward, one crop
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            features = model.backbone(crop)
        z = nn.functional.normalize(model.projection_head(features.float()), dim=1, p=2)
        return model.prototypes(z)

    pending, trained, seen, epochs = sorted(marks), 0.0, 0, 0
    losses, steps = torch.zeros((), device=device), 0
    last = time.perf_counter()  # wall clock, data loading included; evaluations excluded
    while trained < budget_s:
        losses, steps = torch.zeros((), device=device), 0
        for views in loader:
            progress = trained / budget_s if schedule_epochs is None else epochs / schedule_epochs
            for group in optimizer.param_groups:
                group["lr"] = base_lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1)))
            model.prototypes.normalize()
            crops = [v.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                     for v in views]
            loss = criterion([scores(c) for c in crops], [])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses, steps = losses + loss.detach(), steps + 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seen += len(views[0])
            now = time.perf_counter()
            trained, last = trained + now - last, now
            while pending and trained >= pending[0]:
                mark = pending.pop(0)
                if on_mark is not None:
                    model.eval()
                    on_mark(mark, model.backbone)
                    model.train()
                last = time.perf_counter()
            if trained >= budget_s:
                break
        epochs += 1
    if stats is not None:
        stats.update(epochs=epochs, images=seen, images_per_s=round(seen / trained),
                     loss=round(float(losses) / max(steps, 1), 4))
    return model.backbone
