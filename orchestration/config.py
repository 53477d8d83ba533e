"""The experiment configuration: one typed tree with every default in one place.

An experiment is a YAML file (``experiments/*.yaml``) whose sections mirror the dataclasses
below; anything it leaves out takes the default written here.  Command-line overrides are dotted
``section.key=value`` pairs whose values are parsed as YAML (``optim.lr=0.3``,
``model.n_prototypes=[100,30]``).  Loading checks every key and type; the values are checked by
:mod:`orchestration.preflight`.  This module is the schema alone: it imports nothing of the
project, so any process may read a config without building anything.

The loader is written out rather than pydantic's: pydantic's lax mode takes ``"3"`` for an int
and ``"yes"`` for a bool, its strict mode refuses ``1e-4`` as PyYAML reads it (a string), and its
errors are multi-line; matching the one-line ``key: problem`` errors would take a validator and a
formatter about as long as :func:`_coerce` and :func:`_build`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

__all__ = [
    "ConfigError",
    "CropConfig",
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "ModelConfig",
    "OptimConfig",
    "ScalingConfig",
    "SwAVConfig",
    "TrackingConfig",
    "build_config",
    "load_config",
    "merge",
    "nest",
    "parse_overrides",
    "resume_changes",
]

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"


class ConfigError(ValueError):
    """A configuration problem; the message starts with the dotted key."""


@dataclass
class ModelConfig:
    backbone: str = "resnet50"  # convnet | resnet18/34/50/101/152 | wide_resnet50_2 | timm/<name>
    cifar_stem: bool = False  # 3x3/1 first conv, no max-pool: for 32px images
    width: int = 32  # convnet only
    depth: int = 3  # convnet only
    hidden_dim: int = 2048  # projector hidden layer (0: a single linear layer)
    out_dim: int = 128  # embedding dimension
    n_prototypes: Union[int, list[int]] = 3000  # K, or one K per prototype head
    # The weights the backbone starts from (orchestration/pretrained.py): a file (torchvision or
    # timm state dict, `swav-ray export` output, a checkpoint state.pt), runs:/RUN_ID or
    # models:/NAME@ALIAS (another run's backbone) or torchvision:WEIGHTS (downloaded); null:
    # seeded random weights.
    init: Union[str, None] = None
    channels_last: bool = True  # GPU only: the memory format cuDNN's convolutions run fastest in
    # GPU only: torch.compile the backbone and the projection head in place (the same weights and
    # state-dict keys; compiled for each crop size while the run is set up). Off by default: it
    # pays with compile_mode reduce-overhead (CUDA graphs), as cifar10_wallclock sets; alone it
    # did not speed the step up (BENCHMARKS.md).
    compile: bool = False
    # torch.compile's mode for model.compile: default, reduce-overhead (the compiled forward and
    # backward replayed as CUDA graphs: for a step bound by launching its kernels; one worker
    # only), max-autotune (also searches kernel configurations: slow to compile) or
    # max-autotune-no-cudagraphs. Unused while model.compile is false.
    compile_mode: str = "default"
    # GPU only: cuDNN times its convolution algorithms for each new input shape and keeps the
    # fastest (torch.backends.cudnn.benchmark; a run has a few fixed crop sizes). On, as in the
    # official main_swav.py; the timing makes the choice of algorithm, and so the last bits of
    # GPU results, vary from run to run.
    cudnn_benchmark: bool = True


@dataclass
class CropConfig:
    nmb_crops: list[int] = field(default_factory=lambda: [2, 6])
    size_crops: list[int] = field(default_factory=lambda: [224, 96])
    min_scale_crops: list[float] = field(default_factory=lambda: [0.14, 0.05])
    max_scale_crops: list[float] = field(default_factory=lambda: [1.0, 0.14])
    crops_for_assign: list[int] = field(default_factory=lambda: [0, 1])
    color_strength: float = 1.0
    blur_prob: float = 0.5
    flip_prob: float = 0.5  # 0 for data where a mirror image is another thing (digits, text)
    solarize_prob: float = 0.0  # not in SwAV's recipe (BYOL's: 0.2 on one view); after the blur
    # Where crops are made: cpu = PIL in loader workers; gpu = batched on the training device
    # (swav.batch_multicrop); auto = gpu when the run trains on a GPU, and on the CPU when a
    # worker's shard is kept in memory (small data sets, where PIL would cost more than the step).
    device: str = "auto"
    # Batched crops on a GPU: fuse the crop boxes and the augmentation into few kernels with
    # torch.compile (the same crops; compiled once per crop size while the run is set up, which
    # takes seconds; BENCHMARKS.md has its speed).
    compile: bool = False
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.228, 0.224, 0.225])


@dataclass
class SwAVConfig:
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    freeze_prototypes_iters: int = 313  # official: the first epoch of ImageNet at batch 4096
    queue_length: int = 0  # global; 0: no queue
    epoch_queue_starts: int = 15


@dataclass
class OptimConfig:
    name: str = "lars"  # sgd | lars | adamw
    lr: float = 4.8  # base learning rate (after warmup)
    final_lr: float = 0.0048
    start_warmup: float = 0.0
    warmup_epochs: float = 10.0
    weight_decay: float = 1e-6
    momentum: float = 0.9
    epochs: int = 100  # with time_budget_s: the most epochs
    batch_size: int = 64  # images per worker per step
    # Train for about this many seconds (the epochs' own time; orchestration/time_budget.py):
    # whole epochs planned from the last one's time, the schedule fitted to end with the budget.
    time_budget_s: Union[float, None] = None


@dataclass
class DataConfig:
    source: str = "digits"  # one of swav.data.SOURCES: digits, cifar10, parquet, imagefolder, ...
    path: Union[str, None] = None  # root folder / file; not needed for digits
    download: bool = False  # torchvision sources only
    image_column: str = "image"  # parquet
    label_column: Union[str, None] = "label"  # parquet; None: unlabelled
    holdout_fraction: float = 0.2  # held-out share when the source has no test split
    limit: Union[int, None] = None  # use only the first N training images
    max_corrupt_fraction: float = 0.01  # undecodable images are skipped up to this share
    loader_workers: int = 2  # DataLoader processes per Ray worker
    eval_size: Union[int, None] = None  # evaluation image size (default: first crop size)
    # Names of labels 0, 1, ... for figures: a list, or the Parquet schema metadata key that
    # holds them; None: the data's own (torchvision, ImageFolder folders, Parquet "classes").
    class_names: Union[str, list[str], None] = None


@dataclass
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2  # worker failures survived (restart from the last checkpoint)
    storage_path: str = "./runs"  # local dir (relative: to the working directory), shared FS or s3://
    run_name: Union[str, None] = None  # same name + storage_path: resume that run
    seed: int = 0


@dataclass
class TrackingConfig:
    tracking_uri: Union[str, None] = None  # default: $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db
    experiment_name: str = "swav-ray"
    log_model: bool = True
    # Register the logged model in MLflow's registry as a new version of this name (a sweep:
    # its best trial's, with the alias "best"; default there: the sweep file's name).
    register_model: Union[str, None] = None
    system_metrics: Union[bool, None] = None  # CPU/GPU/memory per node into the run; null: GPU runs
    system_metrics_every_s: float = 10.0


@dataclass
class EvalConfig:
    knn_k: int = 200
    knn_temperature: float = 0.07
    knn_every: int = 1  # epochs between kNN evaluations (0: only at the end)
    linear_method: str = "auto"  # swav.evaluation.LINEAR_METHODS (linear eval, frozen features)
    max_train_images: Union[int, None] = 20000  # training images used by evaluate (kNN bank, linear)
    final_evaluation: bool = False  # run `swav-ray evaluate` on the finished run
    explain_images: int = 0  # run `swav-ray explain` on this many held-out images (0: no)
    # swav.counterfactual.METHODS
    explain_methods: list[str] = field(default_factory=lambda: ["ce"])
    # swav.counterfactual.TARGET_MODES: other_label (the nearest prototype of another majority
    # label), nearest; or a prototype index
    explain_target: Union[int, str] = "other_label"


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    swav: SwAVConfig = field(default_factory=SwAVConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}`` for every leaf (MLflow params)."""
        out: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                out.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                out[key] = value
        return out


# -- loading ----------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    """``float``, ``list[int]``, ``float or null`` (YAML's word for None)."""
    if typing.get_origin(tp) is Union:
        return " or ".join("null" if t is type(None) else _type_name(t)
                           for t in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_FLOAT_WITHOUT_DOT = re.compile(r"[-+]?[0-9]+[eE][-+]?[0-9]+")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints (and ``1e-4``) are accepted for
    floats."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected None, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item)}, got {value!r}")
        return [_coerce(v, item, key) for v in value]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT_WITHOUT_DOT.fullmatch(value.strip()):
        return float(value)  # PyYAML (YAML 1.1) reads 1e-4 as a string: it needs "1.0e-4"
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["optim.lr=0.3", "model.n_prototypes=[10,20]"]`` -> nested dict (values parsed as YAML)."""
    flat: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{pair}: overrides are dotted key=value pairs, e.g. optim.lr=0.3")
        try:
            flat[key] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as err:
            raise ConfigError(f"{key}: cannot parse {raw!r}: {err}") from None
    return nest(flat)


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"optim.lr": 0.3, "model.width": 8}`` -> ``{"optim": {"lr": 0.3}, "model": {...}}``."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is not a section")
        node[parts[-1]] = value
    return nested


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_path(config: str | os.PathLike | None) -> Path:
    """A config argument as a file: a path, or a name in ``experiments/`` (``default``), also
    written as the README writes it, ``experiments/<name>.yaml``, from any directory."""
    if config is None:
        return EXPERIMENTS_DIR / "default.yaml"
    path = Path(config)
    if path.exists():
        return path
    if not path.suffix:
        candidate = EXPERIMENTS_DIR / f"{config}.yaml"
    elif path.parent == Path("experiments"):
        candidate = EXPERIMENTS_DIR / path.name
    else:
        candidate = None
    if candidate is not None and candidate.exists():
        return candidate
    names = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))
    raise ConfigError(f"config: no such experiment file {str(path)!r} (by name: "
                      f"{', '.join(names)})")


def load_config(
    config: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> ExperimentConfig:
    """Load an experiment file (default: ``experiments/default.yaml``) and apply overrides: every
    key and type checked, values not (:func:`orchestration.preflight.load_experiment` does both)."""
    path = resolve_path(config)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config: {path} is not valid YAML: {err}") from None
    if isinstance(data, dict) and "search" in data:
        raise ConfigError(f"config: {path} is a sweep file; run it with swav-ray tune {config}")
    return build_config(data, overrides)


def build_config(data: dict[str, Any], overrides: list[str] | None = None) -> ExperimentConfig:
    """A typed config from a (partial) nested dict and dotted overrides; the rest defaults.
    Values are checked by :func:`orchestration.preflight.validate`."""
    return _build(ExperimentConfig, merge(data, parse_overrides(overrides or [])), "")


# Keys that configs stored by earlier versions hold and this one no longer has (a test-only
# switch): dropped when a stored config is read, so that older runs still evaluate and resume.
RETIRED = ("fail_at_epoch",)


def from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Rebuild a config from :meth:`ExperimentConfig.to_dict` (inside a Ray worker; a run's
    stored ``config.yaml``)."""
    return _build(ExperimentConfig, {k: v for k, v in data.items() if k not in RETIRED}, "")


# -- resuming ---------------------------------------------------------------------------------

# What a resume (the same scaling.run_name again) may change: how long it trains, where results
# go and how they are evaluated (and labels named), failures tolerated, loader processes and where crops are made.
# Anything else would silently continue a different experiment under the old run's params.
RESUMABLE = ("optim.epochs", "optim.time_budget_s", "tracking.", "eval.", "scaling.run_name",
             "data.class_names", "scaling.max_failures", "scaling.cpus_per_worker", "data.loader_workers",
             "crops.device", "crops.compile", "model.compile", "model.cudnn_benchmark")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_changes(stored: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Differences between a run's stored config and the one resuming it, as ``key: old -> new``:
    (those a resume may not make, those it may; see ``RESUMABLE``).  A key newer than the
    stored config counts as its default there (the run was made with that behaviour)."""
    old = {k: v for k, v in _flatten(stored).items() if k not in RETIRED}
    now = _flatten(new)
    old = {**{k: v for k, v in _flatten(ExperimentConfig().to_dict()).items() if k in now}, **old}
    refused, allowed = [], []
    for key in sorted(set(old) | set(now)):
        before, after = old.get(key, "(absent)"), now.get(key, "(absent)")
        if before != after:
            change = f"{key}: {before!r} -> {after!r}"
            (allowed if key.startswith(RESUMABLE) else refused).append(change)
    return refused, allowed
