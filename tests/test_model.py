"""Backbones, projection head, prototypes and the multi-resolution forward pass."""

from __future__ import annotations

import pytest
import torch

from swav.model import Prototypes, ProjectionHead, build_backbone, build_model


def test_forward_groups_resolutions_and_keeps_crop_major_rows():
    torch.manual_seed(0)
    model = build_model("convnet", width=8, depth=2, hidden_dim=32, out_dim=16, n_prototypes=[10, 7])
    model.eval()
    big, small = torch.randn(2 * 3, 3, 16, 16), torch.randn(4 * 3, 3, 8, 8)
    z, scores = model([big, small])
    assert z.shape == (18, 16)
    assert [s.shape for s in scores] == [(18, 10), (18, 7)]
    torch.testing.assert_close(z.norm(dim=1), torch.ones(18))
    # Row order: the big crops' rows first, each row the embedding of its own crop.
    alone, _ = model([small[5:6]])
    torch.testing.assert_close(z[6 + 5], alone[0], atol=1e-5, rtol=1e-5)


def test_prototypes_are_unit_vectors_after_normalize():
    protos = Prototypes(8, 5)
    with torch.no_grad():
        protos.heads[0].weight.mul_(3.0)
    protos.normalize_()
    torch.testing.assert_close(protos.heads[0].weight.norm(dim=1), torch.ones(5))
    assert protos.sizes == [5]
    assert protos.heads[0].bias is None


@pytest.mark.parametrize("name,dim", [("resnet18", 512), ("resnet50", 2048)])
def test_resnet_cifar_stem_keeps_32px_resolution(name, dim):
    net, out = build_backbone(name, cifar_stem=True)
    assert out == dim
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    net.eval()
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, dim)


def test_imagenet_stem_is_the_torchvision_default():
    net, _ = build_backbone("resnet18")
    assert net.conv1.kernel_size == (7, 7) and not isinstance(net.maxpool, torch.nn.Identity)


def test_a_trained_resnet_backbone_loads_into_torchvision_s_own_model():
    """What README's "The trained backbone elsewhere" says: the backbone's state dict has
    torchvision's keys, so torchvision's ResNet (fc replaced by Identity; the CIFAR stem's two
    changes if the run used it) loads it strictly and computes the same features."""
    import torchvision

    model = build_model("resnet18", cifar_stem=True, hidden_dim=16, out_dim=8, n_prototypes=5)
    plain = torchvision.models.resnet18()
    plain.fc = torch.nn.Identity()
    plain.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    plain.maxpool = torch.nn.Identity()
    plain.load_state_dict(model.backbone.state_dict())  # strict: every key, no other
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain.eval()(x), model.backbone.eval()(x))


def test_projection_head_layers():
    head = ProjectionHead(12, hidden_dim=20, out_dim=6)
    kinds = [type(m).__name__ for m in head.net]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    linear = ProjectionHead(12, hidden_dim=0, out_dim=6)
    assert isinstance(linear.net, torch.nn.Linear)


@pytest.mark.parametrize(
    "call,field",
    [
        (lambda: build_backbone("vgg11"), "backbone"),
        (lambda: Prototypes(8, 0), "n_prototypes"),
        (lambda: Prototypes(8, [10, 0]), "n_prototypes"),
        (lambda: Prototypes(8, []), "n_prototypes"),
        (lambda: ProjectionHead(8, hidden_dim=-1), "hidden_dim"),
        (lambda: ProjectionHead(8, out_dim=0), "out_dim"),
        (lambda: build_backbone("convnet", width=0), "width"),
    ],
)
def test_bad_configuration_names_the_field(call, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        call()
