"""Starting weights (``model.init``) and exported backbones, on weight files the tests make:
torchvision's own ResNet, this project's checkpoints, an official-SwAV-style checkpoint, and a
run in a real MLflow store. Offline: no published weights are downloaded."""

from __future__ import annotations

import sys

import pytest
import torch
import torchvision
from mlflow.tracking import MlflowClient
from torch import nn

from orchestration import cli
from orchestration.checkpoints import save_state
from orchestration.preflight import load_experiment
from orchestration.pretrained import export_backbone, starting_weights
from orchestration.recipe import initial_model
from orchestration.tracking import TrackedRun
from swav.model import ConvNet


def _config(tmp_path, *overrides: str):
    return load_experiment(None, [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                                  f"scaling.storage_path={tmp_path}/runs", *overrides])


def _resnet18_file(tmp_path, **kwargs) -> str:
    torch.manual_seed(7)
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(**kwargs).state_dict(), path)
    return str(path)


def test_a_torchvision_state_dict_starts_the_backbone_with_every_key_matched(tmp_path):
    path = _resnet18_file(tmp_path)
    cfg = _config(tmp_path, "model.backbone=resnet18", f"model.init={path}")
    start = starting_weights(cfg)
    n = len(initial_model(cfg).backbone.state_dict())
    assert start.report == (f"model.init: {n} of {n} backbone tensors from {path}; "
                            f"not used: fc.weight, fc.bias")
    model = initial_model(cfg, start.tensors)
    reference = torch.load(path, weights_only=True)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, reference[key]), key
    # The head and prototypes keep their seeded initialisation.
    plain = initial_model(cfg)
    assert torch.equal(model.prototypes.heads[0].weight, plain.prototypes.heads[0].weight)


def test_checkpoints_of_this_project_and_of_the_official_swav_give_their_backbone(tmp_path):
    cfg = _config(tmp_path, "model.backbone=resnet18")
    torch.manual_seed(3)
    trained = initial_model(cfg)
    ours = tmp_path / "state.pt"
    save_state(tmp_path, {"engine": {"model": trained.state_dict()}, "epoch": 4})
    official = tmp_path / "swav_800ep_pretrain.pth.tar"  # {"state_dict": {"module.conv1...}}
    torch.save({"epoch": 800, "state_dict": {f"module.{k}": v for k, v in
                                             trained.state_dict().items()}}, official)
    for path in (ours, official):
        start = starting_weights(_config(tmp_path, "model.backbone=resnet18",
                                         f"model.init={path}"))
        assert "not used" not in start.report, start.report  # the head is not the backbone's
        for key, value in trained.backbone.state_dict().items():
            assert torch.equal(start.tensors[key], value), key


@pytest.mark.parametrize(("init", "says"), [
    ("{tmp}/nothing.pt", "model.init: no file {tmp}/nothing.pt"),
    ("{resnet50}", "model.init: {resnet50}: conv1.weight has shape [64, 3, 7, 7], the resnet18 "
                   "backbone's is [64, 3, 3, 3] (weights of another architecture?)"),
    ("{convnet}", "model.init: {convnet}: none of its 18 tensors is a resnet18 backbone key"),
    ("{pickled}", "model.init: cannot load {pickled} as plain tensors"),
    ("torchvision:ResNet18_Weights.NOTHING", "model.init: torchvision:ResNet18_Weights.NOTHING: "
                                             "torchvision has no weights"),
    ("runs:/0123456789abcdef0123456789abcdef", "model.init: runs:/0123456789abcdef0123456789abcd"
                                               "ef: no MLflow run"),
])
def test_bad_starting_weights_are_one_line_before_ray_starts(tmp_path, capsys, init, says):
    files = {"tmp": str(tmp_path), "resnet50": str(tmp_path / "r50.pt"),
             "convnet": str(tmp_path / "convnet.pt"), "pickled": str(tmp_path / "pickled.pt")}
    torch.save(torchvision.models.resnet50().state_dict(), files["resnet50"])
    torch.save(ConvNet(width=8).state_dict(), files["convnet"])
    torch.save({"conv1.weight": nn.Linear(2, 2)}, files["pickled"])  # a module: code to unpickle
    (tmp_path / "mlflow.db").touch()
    code = cli.main(["train", "model.backbone=resnet18", "model.cifar_stem=true",
                     f"model.init={init.format(**files)}",
                     f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                     f"scaling.storage_path={tmp_path}/runs"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"swav-ray: error: {says.format(**files)}"), err[0]
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()


def _finished_run(tmp_path, *overrides: str) -> tuple[str, nn.Module]:
    """A run in a real MLflow store as run_training leaves one (its config and final
    checkpoint), with a model of its own seed standing in for trained weights."""
    cfg = _config(tmp_path, *overrides)
    tracked = TrackedRun.start(cfg, str(tmp_path / "runs" / "r"), "r")
    torch.manual_seed(11)
    model = initial_model(cfg)
    save_state(tmp_path, {"engine": {"model": model.state_dict()}})
    tracked.log_artifact(tmp_path / "state.pt", "checkpoints")
    tracked.end("FINISHED")
    return tracked.run_id, model


def test_an_exported_resnet_loads_into_torchvision_with_identical_features(tmp_path, capsys):
    run_id, model = _finished_run(tmp_path, "model.backbone=resnet18", "model.cifar_stem=true")
    out = tmp_path / "export" / "backbone.pt"
    assert cli.main(["export", "--run-id", run_id, "--tracking-uri",
                     f"sqlite:///{tmp_path}/mlflow.db", str(out)]) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"wrote {out}: the resnet18 backbone, ") and "torchvision" in said
    net = torchvision.models.resnet18()  # as the printed line says
    net.fc = nn.Identity()
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    net.load_state_dict(torch.load(out, weights_only=True))  # strict: every key matched
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net.eval()(images), model.backbone.eval()(images))
    # And back in as a starting point, by file and by run.
    for init in (str(out), f"runs:/{run_id}"):
        start = starting_weights(_config(tmp_path, "model.backbone=resnet18",
                                         "model.cifar_stem=true", f"model.init={init}"))
        assert "left at random" not in start.report and "not used" not in start.report
        assert all(torch.equal(v, model.backbone.state_dict()[k])
                   for k, v in start.tensors.items())


def test_an_exported_convnet_loads_into_swav_s_convnet(tmp_path, capsys):
    run_id, model = _finished_run(tmp_path, "model.backbone=convnet", "model.width=8")
    out = tmp_path / "convnet.pt"
    export_backbone(run_id, out, f"sqlite:///{tmp_path}/mlflow.db")
    net = ConvNet(width=8)  # (model.depth: 3, the default)
    net.load_state_dict(torch.load(out, weights_only=True))
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(net.eval()(images), model.backbone.eval()(images))
    assert not list(tmp_path.glob(".convnet.pt.*"))  # written whole, nothing staged left
    # The same tensors as safetensors, which starts a run with every key matched.
    safe = tmp_path / "convnet.safetensors"
    export_backbone(run_id, safe, f"sqlite:///{tmp_path}/mlflow.db")
    from safetensors.torch import load_file

    tensors = load_file(safe)
    assert tensors.keys() == model.backbone.state_dict().keys()
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in tensors.items())
    start = starting_weights(_config(tmp_path, "model.backbone=convnet", "model.width=8",
                                     f"model.init={safe}"))
    assert start.report == f"model.init: 18 of 18 backbone tensors from {safe}"


def test_a_registered_model_is_evaluated_exported_and_started_from_by_name(tmp_path, capsys):
    run_id, model = _finished_run(tmp_path, "model.backbone=convnet", "model.width=8")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracked = TrackedRun(uri, run_id)
    assert tracked.register_model("digits", alias="best") == "models:/digits/1"
    out = tmp_path / "best.pt"
    assert cli.main(["export", "--model", "models:/digits@best", "--tracking-uri", uri,
                     str(out)]) == 0
    assert torch.equal(torch.load(out, weights_only=True)["net.0.weight"],
                       model.backbone.state_dict()["net.0.weight"])
    start = starting_weights(_config(tmp_path, "model.backbone=convnet", "model.width=8",
                                     "model.init=models:/digits/1"))
    assert start.report == "model.init: 18 of 18 backbone tensors from models:/digits/1"
    assert cli.main(["evaluate", "--model", "models:/digits@best", "--tracking-uri", uri]) == 0
    logged = MlflowClient(uri).get_run(run_id).data.metrics  # into the registered run
    assert 0.1 < logged["eval_knn_top1"] <= 1 and "eval_linear_top1" in logged
    capsys.readouterr()
    assert cli.main(["evaluate", "--model", "models:/digits@worst", "--tracking-uri", uri]) == 2
    assert capsys.readouterr().err.strip() == (
        f"swav-ray: error: model: no registered model models:/digits@worst in {uri}")


def test_a_timm_backbone_trains_from_a_timm_state_dict_and_exports_back_to_timm(tmp_path):
    """backbone: timm/<name>: the timm model without its classifier, feature dimension from
    timm; a timm state dict starts it with every key matched (the classifier left out), and
    the exported backbone loads into timm.create_model(name, num_classes=0) strictly."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(5)
    path = tmp_path / "timm_resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    cfg = _config(tmp_path, "model.backbone=timm/resnet18", f"model.init={path}")
    start = starting_weights(cfg)
    assert start.report.endswith("backbone tensors from " + f"{path}; not used: fc.weight, fc.bias")
    assert start.report.startswith("model.init: 120 of 120 ")
    run_id, model = _finished_run(tmp_path, "model.backbone=timm/resnet18")
    assert model.projection_head.net[0].in_features == 512  # timm's num_features
    out = tmp_path / "timm.pt"
    assert "timm.create_model('resnet18', num_classes=0)" in export_backbone(
        run_id, out, f"sqlite:///{tmp_path}/mlflow.db")
    net = timm.create_model("resnet18", num_classes=0)
    net.load_state_dict(torch.load(out, weights_only=True))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net.eval()(images), model.backbone.eval()(images))


def test_a_vision_transformer_from_timm_takes_every_crop_size():
    pytest.importorskip("timm")
    from swav.model import build_model

    model = build_model("timm/vit_small_patch16_224", hidden_dim=0, out_dim=16, n_prototypes=10)
    with torch.no_grad():
        z, scores = model([torch.randn(2, 3, 32, 32), torch.randn(3, 3, 16, 16)])
    assert z.shape == (5, 16) and scores[0].shape == (5, 10)


def test_an_unknown_timm_model_is_one_line_before_ray_starts(tmp_path, capsys):
    pytest.importorskip("timm")
    code = cli.main(["train", "model.backbone=timm/resnet_nineteen",
                     f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "swav-ray: error: model.backbone: timm has no model 'resnet_nineteen' "
        "(timm.list_models() lists them)")
