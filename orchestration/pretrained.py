"""Where a backbone starts (``model.init``) and how a trained one leaves (``swav-ray export``).

``model.init`` names the weights the backbone starts from instead of its seeded random ones:
- a file: a torchvision or timm state dict, a backbone written by ``swav-ray export``, a
  swav-ray checkpoint ``state.pt``, or an official SwAV checkpoint (``{"state_dict": ...}`` with
  DDP's ``module.`` prefixes); read with ``torch.load(weights_only=True)``, never unpickled;
- ``runs:/RUN_ID`` or ``models:/NAME@ALIAS``: another run's final backbone, or a registered
  model's (pretrain on one data set, adapt on another);
- ``torchvision:WEIGHTS``: published weights torchvision downloads itself (needs the internet at
  run time, like torchvision), e.g. ``torchvision:ResNet18_Weights.IMAGENET1K_V1``.
Tensors are matched to the backbone by name (after ``module.`` and ``backbone.`` prefixes) and
shape. The driver reads them once, before Ray starts, and sends them to the workers, so a file
on the machine that runs ``swav-ray train`` is enough on a cluster.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestration.config import ConfigError, ExperimentConfig

__all__ = ["REPORT_TAG", "StartingWeights", "backbone_state", "export_backbone",
           "starting_weights"]

REPORT_TAG = "init_report"  # the run's tag: what model.init loaded and what it did not
_SHOWN = 4  # keys named in a report before "..."


@dataclass(frozen=True)
class StartingWeights:
    """The backbone tensors ``model.init`` gives (by the backbone's own key names), and the one
    line that says what was loaded and what was not."""

    tensors: dict[str, torch.Tensor]
    report: str


_CACHE: dict[tuple, StartingWeights] = {}  # the driver reads them for the checks and the run


def starting_weights(cfg: ExperimentConfig, tracking_uri: str | None = None
                     ) -> StartingWeights | None:
    """The weights ``cfg.model.init`` names, matched to ``cfg``'s backbone; None without one.
    Bad input (no such file or run, another architecture) is one :class:`ConfigError` line."""
    spec = cfg.model.init
    if not spec:
        return None
    own = _backbone_shapes(cfg)
    key = (spec, tracking_uri or cfg.tracking.tracking_uri, tuple(sorted(own.items())))
    if key not in _CACHE:
        state = backbone_state(_read(spec, tracking_uri or cfg.tracking.tracking_uri), spec)
        _CACHE[key] = _matched(state, own, spec, cfg.model.backbone)
    return _CACHE[key]


def _backbone_shapes(cfg: ExperimentConfig) -> dict[str, tuple[int, ...]]:
    """The backbone's keys and shapes, built on the meta device (no memory, no initialisation)."""
    from swav.model import build_backbone

    m = cfg.model
    with torch.device("meta"):
        net, _ = build_backbone(m.backbone, cifar_stem=m.cifar_stem, width=m.width, depth=m.depth)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _read(spec: str, tracking_uri: str | None) -> Any:
    if spec.startswith(("runs:/", "models:/")):
        return _from_run(spec, tracking_uri)
    if spec.startswith("torchvision:"):
        return _from_torchvision(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.init: no file {spec} (a weights file, runs:/RUN_ID or "
                          f"torchvision:WEIGHTS)")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConfigError(f"model.init: {spec}: reading .safetensors needs the safetensors "
                              f"package (pip install safetensors)") from None
        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (a truncated zip, pickled code refused, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"model.init: cannot load {spec} as plain tensors ({first[:200]})"
                          ) from None


def _from_run(spec: str, tracking_uri: str | None) -> dict[str, torch.Tensor]:
    from orchestration.evaluate import open_tracked_model
    from orchestration.tracking import resolve_tracking_uri, run_of_model

    try:
        run_id = (spec[len("runs:/"):].strip("/") if spec.startswith("runs:/")
                  else run_of_model(spec, resolve_tracking_uri(tracking_uri)))
        tracked = open_tracked_model(run_id, tracking_uri)
    except ConfigError as err:
        raise ConfigError(f"model.init: {spec}: {str(err).split(': ', 1)[-1]}") from None
    return {f"backbone.{k}": v for k, v in tracked.model.backbone.state_dict().items()}


def _from_torchvision(spec: str) -> dict[str, torch.Tensor]:
    import torchvision

    name = spec[len("torchvision:"):]
    try:
        weights = torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise ConfigError(f"model.init: {spec}: torchvision has no weights {name!r} (e.g. "
                          f"ResNet18_Weights.IMAGENET1K_V1)") from None
    try:
        return weights.get_state_dict(progress=False)
    except OSError as err:
        raise ConfigError(f"model.init: {spec}: could not download it ({err}); download it "
                          f"where there is internet and pass the file") from None


def backbone_state(raw: Any, shown_as: str) -> dict[str, torch.Tensor]:
    """The backbone's tensors in what a weights file holds: a checkpoint's model, a
    ``state_dict``/``model`` wrapper, DDP's ``module.`` prefixes, a SwAV model's ``backbone.``
    part (its head and prototypes left out); plain key names otherwise."""
    state = raw
    if isinstance(state, dict) and isinstance(state.get("engine"), dict):
        state = state["engine"].get("model", state)  # a swav-ray checkpoint
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(
            isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.init: {shown_as} holds no state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return state


def _matched(state: dict[str, torch.Tensor], own: dict[str, tuple[int, ...]], spec: str,
             backbone: str) -> StartingWeights:
    for key, shape in own.items():
        if key in state and tuple(state[key].shape) != shape:
            raise ConfigError(f"model.init: {spec}: {key} has shape {list(state[key].shape)}, "
                              f"the {backbone} backbone's is {list(shape)} (weights of another "
                              f"architecture?)")
    used = {k: state[k] for k in own if k in state}
    if not used:
        raise ConfigError(f"model.init: {spec}: none of its {len(state)} tensors is a "
                          f"{backbone} backbone key (it has {_names(list(state))}; the "
                          f"backbone has {_names(list(own))})")
    report = f"model.init: {len(used)} of {len(own)} backbone tensors from {spec}"
    missing = [k for k in own if k not in state]
    unused = [k for k in state if k not in own]
    if missing:
        report += f"; left at random init: {_names(missing)}"
    if unused:
        report += f"; not used: {_names(unused)}"
    return StartingWeights(used, report)


def _names(keys: list[str]) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def export_backbone(run_id: str, out: Path, tracking_uri: str | None = None) -> str:
    """Write run ``run_id``'s trained backbone alone to ``out`` (``.safetensors``, else a
    ``torch.save`` state dict), keys as its library names them; returns how to load it."""
    from orchestration.evaluate import open_tracked_model

    tracked = open_tracked_model(run_id, tracking_uri)
    state = {k: v.detach().cpu().contiguous() for k, v in
             tracked.model.backbone.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", delete=False) as tmp:
        staged = Path(tmp.name)
    try:
        if out.suffix == ".safetensors":
            try:
                from safetensors.torch import save_file
            except ImportError:
                raise ConfigError("OUT: writing .safetensors needs the safetensors package "
                                  "(pip install safetensors), or name a .pt file") from None
            save_file(state, str(staged))
        else:
            torch.save(state, staged)
        staged.replace(out)  # whole or not at all
    finally:
        staged.unlink(missing_ok=True)
    return _how_to_load(tracked.cfg, out, len(state))


def _how_to_load(cfg: ExperimentConfig, out: Path, n: int) -> str:
    m = cfg.model
    if m.backbone == "convnet":
        build = f"swav.model.ConvNet(width={m.width}, depth={m.depth})"
    elif m.backbone.startswith("timm/"):
        build = f"timm.create_model({m.backbone[len('timm/'):]!r}, num_classes=0)"
    else:
        build = f"torchvision.models.{m.backbone}(); net.fc = torch.nn.Identity()"
        if m.cifar_stem:
            build += ("; net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); "
                      "net.maxpool = torch.nn.Identity()")
    return (f"wrote {out}: the {m.backbone} backbone, {n} tensors; load it with: net = {build}; "
            f"net.load_state_dict(torch.load({str(out)!r}, weights_only=True))")
