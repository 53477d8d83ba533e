"""A sweep: a base experiment, a search space over its dotted config keys, and how to search it.

A sweep file (``experiments/sweep_*.yaml``)::

    experiment: default                  # base experiment: a name in experiments/ or a path
    overrides: {optim.epochs: 12}        # dotted overrides of the base (optional)
    search:                              # dotted config key -> one distribution
      model.n_prototypes: {grid: [30, 100]}
      swav.epsilon: {loguniform: [0.02, 0.08]}
      swav.temperature: {choice: [0.1, 0.2]}
      model.width: {randint: [8, 33]}     # low inclusive, high exclusive
      optim.lr: {uniform: [0.001, 0.004]}
      crops:                             # a whole section: named presets, searched as a unit
        choice:
          two_global: {nmb_crops: [2], size_crops: [16], min_scale_crops: [0.6],
                       max_scale_crops: [1.0], crops_for_assign: [0, 1]}
    metric: knn_top1                     # a per-epoch metric (orchestration.metrics); mode from it
    num_samples: 1                       # samples of the random dimensions (x every grid point)
    scheduler: {name: asha, grace_period: 2, reduction_factor: 2}    # or {name: fifo}
                                         # (grace_period: epochs; seconds of training when the
                                         # trials have optim.time_budget_s)
    searcher: random                     # random (Ray's variant generator) | grid | optuna
    max_concurrent_trials: null          # default: what the cluster holds at once
    eval: {final_evaluation: true, explain_images: 16}                # for the best trial

Coupled keys stay consistent because a section (``crops``) is searched only as a whole, by named
presets; every combination of the search's values (both ends of a continuous range) is built and
validated before any trial starts, and the first that fails is named.  Pure: no Ray, no MLflow.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestration.config import (
    ConfigError,
    ExperimentConfig,
    build_config,
    from_dict,
    merge,
    nest,
    parse_overrides,
    resolve_path,
)
from orchestration.metrics import EPOCH_METRICS, LABELLED_METRICS
from orchestration.preflight import validate

__all__ = ["Dimension", "SweepSpec", "load_sweep", "trial_config"]

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
SCHEDULERS = ("asha", "fifo")
SEARCHERS = ("random", "grid", "optuna")
SWEEP_KEYS = ("experiment", "overrides", "search", "metric", "mode", "num_samples", "scheduler",
              "searcher", "max_concurrent_trials", "eval", "name")
# Validating every combination is cheap (models are built on the meta device) up to this many.
MAX_COMBINATIONS = 4096


@dataclass
class Dimension:
    """One searched key: a distribution and its arguments (values, or low/high)."""

    key: str
    kind: str
    values: list[Any]  # grid/choice: the values (preset names for a section); else [low, high]
    presets: dict[str, dict[str, Any]] | None = None  # section searches: name -> section values

    def representatives(self) -> list[Any]:
        """The values every trial config must be valid for (both ends of a range)."""
        if self.kind == "randint":
            return [self.values[0], self.values[1] - 1]
        return list(self.values)

    def describe(self) -> str:
        return f"{self.kind}({', '.join(map(str, self.values))})"


@dataclass
class SweepSpec:
    base: dict[str, Any]  # the base experiment tree (file + overrides), before the search
    dimensions: list[Dimension]
    metric: str = "knn_top1"
    mode: str = "max"
    num_samples: int = 1
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "asha"})
    searcher: str = "random"
    max_concurrent_trials: int | None = None
    final_evaluation: bool = False
    explain_images: int = 0
    name: str | None = None
    source: str = ""  # the sweep file

    def base_config(self) -> ExperimentConfig:
        return from_dict(self.base)

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the spec (stored with the sweep for ``--resume``)."""
        return {"base": self.base, "dimensions": [vars(d) for d in self.dimensions],
                **{k: getattr(self, k) for k in ("metric", "mode", "num_samples", "scheduler",
                                                 "searcher", "max_concurrent_trials",
                                                 "final_evaluation", "explain_images", "name",
                                                 "source")}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepSpec:
        data = dict(data)
        data["dimensions"] = [Dimension(**d) for d in data["dimensions"]]
        return cls(**data)


def trial_config(base: dict[str, Any], dimensions: list[Dimension],
                 values: dict[str, Any]) -> ExperimentConfig:
    """The validated config of one trial: ``values`` maps each searched key to its sample."""
    tree = copy.deepcopy(base)
    leaves: dict[str, Any] = {}
    for dim in dimensions:
        value = _plain(values[dim.key])
        if dim.presets is not None:
            tree = merge(tree, {dim.key: copy.deepcopy(dim.presets[value])})
        else:
            leaves[dim.key] = value
    # Trials never run the full evaluation; the sweep gives it to the best trial only.
    leaves.update({"eval.final_evaluation": False, "eval.explain_images": 0})
    return validate(build_config(merge(tree, nest(leaves))))


def _plain(value: Any) -> Any:
    """numpy scalars (as searchers sample them) -> Python values."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict)) else value


# -- loading ----------------------------------------------------------------------------------

def load_sweep(path: str, overrides: list[str] | None = None) -> SweepSpec:
    """Read and check a sweep file; ``overrides`` are dotted overrides of the base experiment."""
    file = resolve_path(path)
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"sweep: {file} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"sweep: {file} must be a mapping with a 'search' section")
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown and "search" not in data and set(data) <= set(ExperimentConfig.__annotations__):
        raise ConfigError(f"sweep: {file} is an experiment, not a sweep (a sweep names its "
                          f"experiment and a 'search' section: e.g. sweep_default)")
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown sweep key (known: {', '.join(SWEEP_KEYS)})")
    experiment = data.get("experiment")
    if experiment is not None and not Path(str(experiment)).is_absolute():
        near = file.parent / str(experiment)  # relative to the sweep file, else a name
        experiment = str(near) if near.exists() else experiment
    base_file = resolve_path(experiment)
    base = yaml.safe_load(base_file.read_text()) or {}
    extra = data.get("overrides") or {}
    if not isinstance(extra, dict):
        raise ConfigError("overrides: expected a mapping of dotted keys to values")
    base = merge(merge(base, nest({str(k): v for k, v in extra.items()})),
                 parse_overrides(overrides or []))
    validate(build_config(base))  # the base itself must be a valid experiment
    spec = _spec(data, base, str(file))
    check_spec(spec)
    return spec


def _spec(data: dict[str, Any], base: dict[str, Any], source: str) -> SweepSpec:
    search = data.get("search")
    if not isinstance(search, dict) or not search:
        raise ConfigError("search: a sweep needs a 'search' mapping of config keys to "
                          "distributions")
    dims = [_dimension(str(k), v) for k, v in search.items()]
    metric = data.get("metric", "knn_top1")
    if metric not in EPOCH_METRICS:
        raise ConfigError(f"metric: {metric!r} is not reported by trials (they report: "
                          f"{', '.join(EPOCH_METRICS)})")
    mode = data.get("mode", EPOCH_METRICS[metric][1])
    if mode not in ("min", "max"):
        raise ConfigError(f"mode: expected min or max, got {mode!r}")
    scheduler = data.get("scheduler") or {"name": "asha"}
    if isinstance(scheduler, str):
        scheduler = {"name": scheduler}
    ev = data.get("eval") or {}
    if not isinstance(ev, dict) or set(ev) - {"final_evaluation", "explain_images"}:
        raise ConfigError("eval: expected a mapping with final_evaluation and/or explain_images")
    return SweepSpec(
        base=base, dimensions=dims, metric=metric, mode=mode,
        num_samples=data.get("num_samples", 1), scheduler=dict(scheduler),
        searcher=data.get("searcher", "random"),
        max_concurrent_trials=data.get("max_concurrent_trials"),
        final_evaluation=bool(ev.get("final_evaluation", False)),
        explain_images=int(ev.get("explain_images", 0)), name=data.get("name"), source=source)


def _dimension(key: str, spec: Any) -> Dimension:
    where = f"search.{key}"
    defaults = ExperimentConfig().to_dict()
    section, _, leaf = key.partition(".")
    if section not in defaults or (leaf and leaf not in defaults[section]) or "." in leaf:
        known = ", ".join(k for k, v in defaults.items() if isinstance(v, dict))
        raise ConfigError(f"{where}: not a config key (sections: {known}; keys as section.key)")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: expected one distribution, e.g. {{grid: [a, b]}} or "
                          f"{{loguniform: [low, high]}} ({', '.join(DISTRIBUTIONS)})")
    ((kind, args),) = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution {kind!r} (expected one of "
                          f"{', '.join(DISTRIBUTIONS)})")
    if not leaf:  # a whole section: named presets
        if kind not in ("grid", "choice") or not isinstance(args, dict) or not args or not all(
                isinstance(v, dict) for v in args.values()):
            raise ConfigError(f"{where}: a section is searched as a whole: {{choice: {{name: "
                              f"{{key: value, ...}}, ...}}}} (or grid) of named presets")
        bad = sorted({k for v in args.values() for k in v} - set(defaults[section]))
        if bad:
            raise ConfigError(f"{where}: preset key {bad[0]!r} is not in section {section}")
        return Dimension(key, kind, [str(n) for n in args], {str(n): v for n, v in args.items()})
    if kind in ("grid", "choice"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {kind} needs a non-empty list of values, got {args!r}")
        return Dimension(key, kind, args)
    return Dimension(key, kind, _range(where, kind, args))


def _range(where: str, kind: str, args: Any) -> list[float]:
    ok = isinstance(args, list) and len(args) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in args)
    if not ok:
        raise ConfigError(f"{where}: {kind} needs [low, high], got {args!r}")
    low, high = args
    if not low < high:
        raise ConfigError(f"{where}: {kind} needs low < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs 0 < low, got {low}")
    if kind == "randint" and not (isinstance(low, int) and isinstance(high, int)):
        raise ConfigError(f"{where}: randint needs integer bounds, got [{low}, {high}]")
    return [low, high]


# -- checks before any trial ------------------------------------------------------------------

def check_spec(spec: SweepSpec) -> None:
    """Settings, the metric against the data, and every combination of searched values."""
    if not isinstance(spec.num_samples, int) or spec.num_samples < 1:
        raise ConfigError(f"num_samples: must be an integer >= 1, got {spec.num_samples!r}")
    name = spec.scheduler.get("name")
    if name not in SCHEDULERS:
        raise ConfigError(f"scheduler.name: expected one of {', '.join(SCHEDULERS)}, got {name!r}")
    allowed = {"name", "grace_period", "reduction_factor"} if name == "asha" else {"name"}
    bad = sorted(set(spec.scheduler) - allowed)
    if bad:
        raise ConfigError(f"scheduler.{bad[0]}: unknown for {name} (known: "
                          f"{', '.join(sorted(allowed))})")
    for key, low in (("grace_period", 1), ("reduction_factor", 2)):
        value = spec.scheduler.get(key, low)
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"scheduler.{key}: must be an integer >= {low}, got {value!r}")
    if spec.searcher not in SEARCHERS:
        raise ConfigError(f"searcher: expected one of {', '.join(SEARCHERS)}, got "
                          f"{spec.searcher!r}")
    ranged = [d.key for d in spec.dimensions if d.kind not in ("grid", "choice")]
    if spec.searcher == "grid" and ranged:
        raise ConfigError(f"search.{ranged[0]}: the grid searcher takes grid or choice only")
    grids = [d.key for d in spec.dimensions if d.kind == "grid"]
    if spec.searcher == "optuna" and grids:
        raise ConfigError(f"search.{grids[0]}: optuna samples; use choice instead of grid")
    m = spec.max_concurrent_trials
    if m is not None and (not isinstance(m, int) or m < 1):
        raise ConfigError(f"max_concurrent_trials: must be an integer >= 1, got {m!r}")
    _check_metric(spec)
    _check_combinations(spec)


def _check_metric(spec: SweepSpec) -> None:
    cfg = spec.base_config()
    d = cfg.data
    if spec.metric in LABELLED_METRICS:
        if d.source == "parquet" and d.label_column is None:
            raise ConfigError(f"metric: {spec.metric} needs labels and data.label_column is "
                              f"null; sweep an unlabelled source on metric: loss")
        if spec.scheduler["name"] == "asha" and cfg.eval.knn_every != 1:
            raise ConfigError(f"metric: ASHA compares {spec.metric} every epoch but "
                              f"eval.knn_every is {cfg.eval.knn_every}; set eval.knn_every: 1")
        if spec.metric == "knn_top1_random_init":
            raise ConfigError("metric: knn_top1_random_init is the untrained baseline (epoch 0 "
                              "only); sweep on knn_top1")
    if spec.metric == "setup_s":
        raise ConfigError("metric: setup_s is reported once, before training (a worker's "
                          "set-up); sweep on knn_top1 or loss")


def _check_combinations(spec: SweepSpec) -> None:
    """Build every combination of representative values (one value per dimension at a time
    beyond MAX_COMBINATIONS): an invalid config is named before any trial starts."""
    reps = [d.representatives() for d in spec.dimensions]
    if math.prod(len(r) for r in reps) <= MAX_COMBINATIONS:
        combos = itertools.product(*reps)
    else:
        first = [r[0] for r in reps]
        combos = (tuple(v if j == i else first[j] for j in range(len(reps)))
                  for i, r in enumerate(reps) for v in r)
    for combo in combos:
        values = {d.key: v for d, v in zip(spec.dimensions, combo)}
        try:
            trial_config(spec.base, spec.dimensions, values)
        except ConfigError as err:
            shown = ", ".join(f"{k}={v}" for k, v in values.items())
            raise ConfigError(f"search: {shown} makes an invalid config: {err}") from None
