"""What a finished sweep reports: one row per trial, the best trial, and what the parent MLflow
run gets (best trial id/metric/config, a CSV of all trials, the metric against each swept knob,
all learning curves in one figure) and the console table."""

from __future__ import annotations

import copy
import csv
import io
import math
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from orchestration.failures import first_line
from orchestration.sweep import SweepSpec, trial_config
from orchestration.sweep_ledger import Ledger

__all__ = ["TrialRow", "best_row", "format_table", "log_sweep_results", "trial_rows"]

_TRIAL_ID = re.compile(r"_([0-9a-f]{5}_\d{5})(_|$)")


@dataclass
class TrialRow:
    trial_id: str
    run_id: str | None
    values: dict[str, Any]  # swept key -> this trial's value
    metric: float | None  # the sweep metric at the trial's last epoch
    epochs: int  # epochs trained
    planned_epochs: int
    status: str  # finished | stopped (by the scheduler) | error | unfinished (interrupted)
    config: dict[str, Any]  # the trial's whole config tree
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, metric)
    error: str | None = None  # an errored trial: the line naming why


def trial_rows(grid, spec: SweepSpec, client, parent_run_id: str,
               ledger: Ledger | None = None) -> list[TrialRow]:
    """One row per trial of a Tune ``ResultGrid`` (with its MLflow child run); ``ledger``: what
    an interruption cut short, and the configs of trials that never reported."""
    ledger = ledger or Ledger()
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    run_ids = {r.data.tags.get("trial_id"): r.info.run_id for r in children}
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or _trial_id_from_path(result.path)
        config = result.config or ledger.configs.get(trial_id, {})
        values = {d.key: config.get(d.key) for d in spec.dimensions}
        cfg = trial_config(spec.base, spec.dimensions, values)
        epochs = int(metrics.get("epochs_done", 0))
        planned = int(metrics.get("epochs_planned", cfg.optim.epochs))  # (a time budget's plan)
        status = _status(result.error, epochs, planned, ledger.interrupted and (
            trial_id in ledger.cut_short or epochs == 0))
        rows.append(TrialRow(trial_id, run_ids.get(trial_id), values, _last(metrics, spec.metric),
                             epochs, planned, status, cfg.to_dict(),
                             _curve(result.metrics_dataframe, spec.metric),
                             error_line(result.error)))
    return sorted(rows, key=lambda r: r.trial_id)


def _status(error, epochs: int, planned: int, cut_short: bool) -> str:
    if error:
        return "error"
    if epochs >= planned:
        return "finished"
    return "unfinished" if cut_short else "stopped"


def error_line(error: BaseException | None) -> str | None:
    """Why a trial failed, in one line: a ``TrainingFailed``'s cause (Ray wraps a trial's error
    and keeps the original as ``cause``), else the error's own first line."""
    if error is None:
        return None
    inner: Any = error
    for _ in range(4):
        cause = getattr(inner, "cause", None)
        if isinstance(cause, str):
            return cause
        if not isinstance(cause, BaseException):
            break
        inner = cause
    return first_line(inner)


def _trial_id_from_path(path: str) -> str:
    match = _TRIAL_ID.search(str(path).rstrip("/").rsplit("/", 1)[-1])
    return match.group(1) if match else str(path)


def _last(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None or not math.isfinite(float(value)) else float(value)


def _curve(frame, metric: str) -> list[tuple[int, float]]:
    if frame is None or metric not in frame or "epoch" not in frame:
        return []
    rows = frame[["epoch", metric]].dropna()
    return [(int(e), float(v)) for e, v in zip(rows["epoch"], rows[metric])]


def best_row(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """The trial with the best metric at its last epoch (errored trials and those an
    interruption cut short excluded)."""
    scored = [r for r in rows if r.metric is not None and r.status in ("finished", "stopped")]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r.metric)


def best_config_tree(spec: SweepSpec, best: TrialRow) -> dict[str, Any]:
    """The best trial's config as ``swav-ray train`` takes it: a new run name, the base's
    evaluation settings (trials run without the final evaluation)."""
    tree = copy.deepcopy(best.config)
    tree["scaling"]["run_name"] = None
    tree["eval"] = spec.base_config().to_dict()["eval"]
    return tree


# -- the parent run ---------------------------------------------------------------------------

def log_sweep_results(parent, spec: SweepSpec, rows: list[TrialRow]):
    """Best trial (tags, metric, params, YAML), trials CSV and figures into the parent run."""
    client, run_id = parent.client, parent.run_id
    client.log_text(run_id, trials_csv(rows, spec), "sweep/trials.csv")
    _log_figure(client, run_id, metric_by_knob(rows, spec), "sweep/metric_by_knob.png")
    _log_figure(client, run_id, learning_curves(rows, spec), "sweep/learning_curves.png")
    best = best_row(rows, spec.mode)
    if best is None:
        return None, None
    tree = best_config_tree(spec, best)
    client.set_tag(run_id, "best_trial_id", best.trial_id)
    client.set_tag(run_id, "best_run_id", str(best.run_id))
    client.log_metric(run_id, f"best_{spec.metric}", best.metric)
    logged = client.get_run(run_id).data.params
    for key, value in best.values.items():
        if f"best.{key}" not in logged:  # params are write-once; a resumed sweep keeps them
            client.log_param(run_id, f"best.{key}", value)
    client.log_text(run_id, yaml.safe_dump(tree, sort_keys=False), "sweep/best_config.yaml")
    return best, tree


def _log_figure(client, run_id: str, figure, path: str) -> None:
    import matplotlib.pyplot as plt

    client.log_figure(run_id, figure, path)
    plt.close(figure)


def trials_csv(rows: list[TrialRow], spec: SweepSpec) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    keys = [d.key for d in spec.dimensions]
    writer.writerow(["trial_id", "run_id", *keys, spec.metric, "epochs", "status"])
    for r in rows:
        writer.writerow([r.trial_id, r.run_id, *(r.values[k] for k in keys), r.metric, r.epochs,
                         r.status])
    return out.getvalue()


def format_table(rows: list[TrialRow], spec: SweepSpec, best: TrialRow | None) -> str:
    """The console table: swept values, metric, epochs run, status; the best marked '*'."""
    keys = [d.key for d in spec.dimensions]
    header = ["", "trial", *keys, spec.metric, "epochs", "status"]
    body = [["*" if best is not None and r.trial_id == best.trial_id else "", r.trial_id,
             *(_short(r.values[k]) for k in keys),
             "-" if r.metric is None else f"{r.metric:.4f}", f"{r.epochs}/{r.planned_epochs}",
             r.status] for r in rows]
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip()
             for line in [header, *body]]
    lines += [f"trial {r.trial_id} failed: {r.error}" for r in rows if r.error]
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# -- figures ----------------------------------------------------------------------------------

_STATUS_STYLE = {"finished": ("tab:blue", "o"), "stopped": ("tab:orange", "v"),
                 "error": ("tab:red", "x")}


def metric_by_knob(rows: list[TrialRow], spec: SweepSpec):
    """The sweep metric at each trial's last epoch against each swept knob."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = spec.dimensions
    fig, axes = plt.subplots(1, len(dims), figsize=(3.6 * len(dims), 3.2), squeeze=False)
    for ax, dim in zip(axes[0], dims):
        categorical = dim.kind in ("grid", "choice")
        order = [str(v) for v in dim.values] if categorical else None
        for status, (colour, marker) in _STATUS_STYLE.items():
            pts = [(r.values[dim.key], r.metric) for r in rows
                   if r.status == status and r.metric is not None]
            if not pts:
                continue
            xs = [order.index(str(x)) if categorical else x for x, _ in pts]
            ax.scatter(xs, [y for _, y in pts], c=colour, marker=marker, label=status)
        if categorical:
            ax.set_xticks(range(len(order)), order, rotation=30 if len(order) > 3 else 0)
            ax.set_xlim(-0.5, len(order) - 0.5)
        elif dim.kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(dim.key)
        ax.set_ylabel(f"{spec.metric} (last epoch)")
        ax.grid(alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:  # (no trial with a figure yet: no legend)
        axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{spec.metric} ({spec.mode}) against each swept knob, {len(rows)} trials")
    fig.tight_layout()
    return fig


def learning_curves(rows: list[TrialRow], spec: SweepSpec):
    """Every trial's per-epoch metric in one figure (dashed: stopped early or cut short)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in rows:
        if not r.curve:
            continue
        label = ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in r.values.items())
        ax.plot([e for e, _ in r.curve], [v for _, v in r.curve], marker=".",
                linestyle="-" if r.status == "finished" else "--", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(spec.metric)
    ax.set_title(f"{spec.metric} per epoch, all trials (dashed: not finished)")
    ax.grid(alpha=0.3)
    if len(rows) <= 16 and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig
