"""``swav-ray tune``: a Ray Tune sweep whose trials are full Ray Train runs, tracked in MLflow.

Ray Train V2 inside Tune, as the installed Ray documents it: each trial is a driver function that
builds the trial's config (:func:`orchestration.sweep.trial_config`) and calls
:func:`orchestration.train.run_training`, whose TorchTrainer reports every epoch to Tune through
``TuneReportCallback``.  So a trial has its own worker group and gathers its Sinkhorn codes over
it, and ASHA sees one result per epoch (time axis ``epochs_done``; for trials with
``optim.time_budget_s``, the training seconds ``training_s``).  Trial runs are named
``<sweep>-<trial id>``: a resumed sweep restarts an unfinished trial under the same name, and Ray
Train resumes it from its last checkpoint.

MLflow: the sweep is a parent run (the base config as params, ``search.<key>`` for the space),
each trial a child run with the same params and metrics as a plain ``swav-ray train`` run.  All
processes log through one server (:mod:`orchestration.mlflow_server` for a SQLite store).  A
trial that ASHA stops is marked KILLED by :class:`TrialRunStatus`, in the Tune driver.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import yaml
from mlflow.tracking import MlflowClient
from ray import tune

from orchestration.capacity import check_fits, connected_cluster, totals
from orchestration.checkpoints import storage_root
from orchestration.config import ConfigError, ExperimentConfig
from orchestration.mlflow_server import serving
from orchestration.sweep import SweepSpec, trial_config
from orchestration.sweep_ledger import SweepLedger, ledger_of
from orchestration.sweep_report import log_sweep_results, trial_rows
from orchestration.tracking import (
    TrackedRun,
    read_text,
    resolve_tracking_uri,
    source_tags,
    write_text,
)
from orchestration.train import run_training
from orchestration.train_callbacks import ReportEpochsToTune
from orchestration.trial_stop import StopWhenTuneStops, TrialStopped, TrialStopWatcher
from orchestration.worker import FAIL_AT_EPOCH

__all__ = ["SweepOutcome", "default_sweep_name", "run_sweep", "trial_resources"]

DRIVER_CPU = 0.5  # the trial's driver function; Ray Train's controller takes none
SPEC_FILE = "swav_sweep.yaml"


@dataclass
class SweepOutcome:
    name: str
    parent_run_id: str
    tracking_uri: str
    rows: list[Any]  # sweep_report.TrialRow
    best: Any | None
    best_config: dict[str, Any] | None
    best_metrics: dict[str, float] = field(default_factory=dict)
    unfinished: int = 0  # trials an interruption left unfinished (--resume continues them)


def trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What one trial holds: its Train workers plus its driver."""
    sc = cfg.scaling
    return {"CPU": sc.num_workers * sc.cpus_per_worker + DRIVER_CPU,
            "GPU": float(sc.num_workers if sc.use_gpu else 0)}


def concurrent_trials(spec: SweepSpec) -> int:
    """Trials the connected cluster holds at once (or the sweep's own limit, if lower); a trial
    that does not fit at all is a one-line error before any trial starts."""
    need = trial_resources(spec.base_config())
    cluster = connected_cluster()
    check_fits(spec.base_config(), cluster)
    have = totals(cluster)
    fits = []
    for kind, amount in need.items():
        if amount <= 0:
            continue
        if amount > have.get(kind, 0):
            sc = spec.base_config().scaling
            raise ConfigError(
                f"scaling.num_workers: a trial needs {amount:g} {kind} ({sc.num_workers} workers "
                f"+ its driver), {cluster.source} has {have.get(kind, 0):g}")
        fits.append(int(have[kind] // amount))
    most = min(fits)
    return min(most, spec.max_concurrent_trials or most)


def max_epochs(spec: SweepSpec) -> int:
    """The most epochs a trial of the sweep trains (``optim.epochs`` may be searched)."""
    return max(_searched_or_base(spec, "optim.epochs"))


def max_time_budget(spec: SweepSpec) -> float | None:
    """The largest ``optim.time_budget_s`` of the sweep's trials, None if none has one."""
    budgets = [b for b in _searched_or_base(spec, "optim.time_budget_s") if b is not None]
    return max(budgets) if budgets else None


def _searched_or_base(spec: SweepSpec, key: str) -> list[Any]:
    dim = {d.key: d for d in spec.dimensions}.get(key)
    if dim is not None:
        return dim.representatives()
    section, name = key.split(".")
    return [getattr(getattr(spec.base_config(), section), name)]


def _distribution(dim, grid_searcher: bool):
    if dim.kind == "grid" or (grid_searcher and dim.kind == "choice"):
        return tune.grid_search(dim.values)
    if dim.kind == "choice":
        return tune.choice(dim.values)
    if dim.kind == "uniform":
        return tune.uniform(*dim.values)
    if dim.kind == "loguniform":
        return tune.loguniform(*dim.values)
    return tune.randint(*dim.values)


def _tune_config(spec: SweepSpec, max_concurrent: int) -> tune.TuneConfig:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s, budget = spec.scheduler, max_time_budget(spec)
    if s["name"] == "asha" and budget is not None:
        # Trials with a wall-clock budget are compared at equal training time (the run's clock,
        # training_s): grace_period is then in seconds, by default an eighth of the budget.
        scheduler = ASHAScheduler(time_attr="training_s", max_t=budget,
                                  grace_period=s.get("grace_period", max(1, round(budget / 8))),
                                  reduction_factor=s.get("reduction_factor", 2))
    elif s["name"] == "asha":
        scheduler = ASHAScheduler(time_attr="epochs_done", max_t=max_epochs(spec),
                                  grace_period=s.get("grace_period", 1),
                                  reduction_factor=s.get("reduction_factor", 2))
    else:
        scheduler = FIFOScheduler()
    search_alg = None
    if spec.searcher == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise ConfigError("searcher: optuna is not installed (pip install 'swav-ray[optuna]')"
                              ) from None
        search_alg = OptunaSearch()
    return tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler,
                           search_alg=search_alg, num_samples=spec.num_samples,
                           max_concurrent_trials=max_concurrent,
                           # The next trial skips the actor's start and imports (11-14 s on 2
                           # cores); a stopped trial ends its Train run (trial_stop).
                           reuse_actors=True)


def _trial(config: dict[str, Any], context: dict[str, Any]) -> None:
    """One trial (a Tune function): the trial's config, trained by a full Ray Train run."""
    from orchestration.sweep import Dimension

    trial_id = tune.get_context().get_trial_id()
    _inject_faults(context.get("fail_at_epoch"))
    dims = [Dimension(**d) for d in context["dimensions"]]
    cfg = trial_config(context["base"], dims, config)
    cfg.tracking.register_model = None  # (the sweep registers its best trial's model)
    name = f"{context['sweep']}-{trial_id}"
    run_dir = f"{storage_root(cfg)}/{name}"
    watcher = TrialStopWatcher(run_dir)  # (a stopped trial ends its run: the actor is reused)
    try:
        outcome = run_training(cfg, parent_run_id=context["parent"],
                               callbacks=[StopWhenTuneStops(run_dir),
                                          ReportEpochsToTune(cfg.optim.epochs)],
                               run_name=name, tracking_uri=context["uri"],
                               tags={"trial_id": trial_id, "sweep": context["sweep"],
                                     **source_tags(context.get("command"))},
                               export_model=False)  # (the best trial's, at the sweep's end)
    except TrialStopped:
        return  # (Tune stopped it: nothing more to report)
    finally:
        watcher.done()
    tune.report({k: v for k, v in outcome.metrics.items() if isinstance(v, (int, float))})


# parent run id -> the URI its sweep logs to now (a resumed sweep has a new private server; Tune
# restores its callbacks from the sweep's saved state, with the URI of the first start).
_LIVE_URIS: dict[str, str] = {}


class TrialRunStatus(tune.Callback):
    """Ends the MLflow run of a trial Tune ended before its function did: KILLED when the
    scheduler stopped it, FAILED when it errored (runs that ended themselves are left alone)."""

    def __init__(self, parent_run_id: str) -> None:
        self.parent = parent_run_id

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        end_trial_runs(_LIVE_URIS[self.parent], self.parent, "KILLED", trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        end_trial_runs(_LIVE_URIS[self.parent], self.parent, "FAILED", trial.trial_id)


def end_trial_runs(uri: str, parent_run_id: str, status: str, trial_id: str | None = None
                   ) -> None:
    """End the sweep's child runs (one trial's, or all) that are still RUNNING."""
    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    query = f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"
    if trial_id is not None:
        query += f" and tags.trial_id = '{trial_id}'"
    for run in client.search_runs([parent.info.experiment_id], filter_string=query):
        client.set_terminated(run.info.run_id, status=status)


class SweepProgress(tune.Callback):
    """The console of ``swav-ray tune``: one progress bar over all trials' epochs, or their
    training seconds when they have a time budget (the best metric so far beside it), and one
    line per ended trial."""

    def __init__(self, spec: SweepSpec, trials: int, parent_run_id: str | None = None) -> None:
        self.parent = parent_run_id
        budget = max_time_budget(spec)
        self.spec, self.timed = spec, budget is not None
        self.total = trials * (budget if self.timed else max_epochs(spec))
        self.bar = None
        self.best: float | None = None
        self.done: dict[str, float] = {}  # trial id -> its epochs (or training seconds) so far

    def setup(self, **info) -> None:
        """The bar from the start: a sweep's first result comes after Ray, the MLflow server,
        the first trial's workers and its first epoch (a minute on 2 cores)."""
        self._ensure_bar()

    def _ensure_bar(self):
        if self.bar is None:
            from tqdm import tqdm

            unit = "s" if self.timed else "epochs"
            self.bar = tqdm(total=self.total, desc="sweep", dynamic_ncols=True,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} "
                                       f"{unit} [{{elapsed}}<{{remaining}}{{postfix}}]")
        return self.bar

    def _advance(self, trial, result: dict) -> None:
        """The bar to the trial's latest figure (each result carries its running totals; the
        trial's final result may reach the callback only as its last result at completion)."""
        now = float(result.get("training_s" if self.timed else "epochs_done", 0) or 0)
        seen = self.done.get(trial.trial_id, 0.0)
        if now > seen:
            self._ensure_bar().update(now - seen)
            self.done[trial.trial_id] = now

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._take(trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._take(trial, trial.last_result or {})
        parent = getattr(self, "parent", None)
        cut = parent is not None and ledger_of(parent).interrupted
        self._line(trial, "interrupted" if cut else "ended")

    def _take(self, trial, result: dict) -> None:
        self._advance(trial, result)
        value = result.get(self.spec.metric)
        if value is not None and (self.best is None or (
                value > self.best if self.spec.mode == "max" else value < self.best)):
            self.best = float(value)
            self._ensure_bar().set_postfix_str(f"best {self.spec.metric} {self.best:.4f}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._line(trial, "failed")

    def _line(self, trial, what: str) -> None:
        last = trial.last_result or {}
        values = ", ".join(f"{d.key}={trial.config.get(d.key)}" for d in self.spec.dimensions)
        metric = last.get(self.spec.metric)
        shown = "-" if metric is None else f"{metric:.4f}"
        self._ensure_bar().write(f"trial {trial.trial_id} {what} after {last.get('epochs_done', 0)}"
                                 f" epochs: {self.spec.metric} {shown} ({values})")

    def on_experiment_end(self, trials, **info) -> None:
        if self.bar is not None:
            self.bar.close()


def _start_parent(spec: SweepSpec, name: str, sweep_dir: str, uri: str,
                  command: str | None) -> TrackedRun:
    base = spec.base_config()
    parent = TrackedRun.start(base, sweep_dir, name, extra_tags={
        "swav_ray.kind": "sweep", "sweep_file": spec.source, **source_tags(command)}, uri=uri)
    if not parent.resumed:
        from mlflow.entities import Param

        params = [Param(f"search.{d.key}", d.describe()[:6000]) for d in spec.dimensions]
        params += [Param(f"sweep.{k}", str(v)) for k, v in (
            ("metric", spec.metric), ("mode", spec.mode), ("num_samples", spec.num_samples),
            ("scheduler", spec.scheduler), ("searcher", spec.searcher))]
        parent.client.log_batch(parent.run_id, params=params)
        parent.client.log_text(parent.run_id, yaml.safe_dump(spec.to_dict(), sort_keys=False),
                               f"sweep/{SPEC_FILE}")
    return parent


def sweep_dir_of(root: str, name: str) -> str:
    return f"{root}/{name}"


def load_saved_spec(root: str, name: str) -> SweepSpec:
    """The spec a sweep was started with (for ``--resume``)."""
    text = read_text(f"{sweep_dir_of(root, name)}/{SPEC_FILE}")
    if text is None:
        raise ConfigError(f"resume: no sweep {name!r} under {root} (no {SPEC_FILE})")
    return SweepSpec.from_dict(yaml.safe_load(text))


def default_sweep_name(source: str) -> str:
    """``sweep-<file>-<time>``, the file's own ``sweep_`` prefix not doubled:
    ``sweep_default.yaml`` -> ``sweep-default-20261207-221500``."""
    stem = Path(source).stem.removeprefix("sweep_").removeprefix("sweep-")
    return time.strftime(f"sweep-{stem}-%Y%m%d-%H%M%S")


def run_sweep(spec: SweepSpec, name: str | None = None, resume: bool = False,
              progress: bool = False, command: str | None = None) -> SweepOutcome:
    """Run (or resume) the sweep on the connected Ray cluster (``progress``: the console's bar
    and trial lines; ``command``: the command line, MLflow's source of its runs)."""
    base = spec.base_config()
    name = name or spec.name or default_sweep_name(spec.source)
    root = storage_root(base)
    sweep_dir = sweep_dir_of(root, name)
    saved = read_text(f"{sweep_dir}/{SPEC_FILE}")
    if saved is not None and not resume:
        raise ConfigError(f"name: sweep {name!r} already exists under {root}; resume it with "
                          f"swav-ray tune --resume {name}")
    max_concurrent = concurrent_trials(spec)
    uri = resolve_tracking_uri(base.tracking.tracking_uri)  # (reachable: checked by preflight)
    with serving(uri) as live_uri:
        parent = _start_parent(spec, name, sweep_dir, live_uri, command)
        _LIVE_URIS[parent.run_id] = live_uri
        write_text(f"{sweep_dir}/{SPEC_FILE}", yaml.safe_dump(spec.to_dict(), sort_keys=False))
        try:
            grid = _fit(spec, name, root, parent, live_uri, max_concurrent, resume, progress,
                        command)
            # Trials Tune never ended (an interrupted sweep): their runs are not left RUNNING.
            end_trial_runs(live_uri, parent.run_id, "KILLED")
            rows = trial_rows(grid, spec, parent.client, parent.run_id, ledger_of(parent.run_id))
            _mark_unfinished(parent.client, rows)
            ended = sum(r.status in ("finished", "stopped", "error") for r in rows)
            unfinished = trial_count(spec) - ended if ledger_of(parent.run_id).interrupted else 0
            best, best_config = log_sweep_results(parent, spec, rows)
            if best is not None and not unfinished:
                _register_best(spec, best, parent, live_uri)
            best_metrics = {} if unfinished else _evaluate_best(spec, best, best_config,
                                                                 live_uri)
        except BaseException:
            parent.end_if_running("FAILED")
            end_trial_runs(live_uri, parent.run_id, "KILLED")
            raise
        parent.end("KILLED" if unfinished else "FINISHED")
    return SweepOutcome(name, parent.run_id, uri, rows, best, best_config, best_metrics,
                        unfinished)


def _mark_unfinished(client: MlflowClient, rows: list) -> None:
    """The runs of trials an interruption cut short end KILLED, even one whose training ended
    as Tune stopped it (``--resume`` continues each in its own run)."""
    for row in rows:
        if row.status == "unfinished" and row.run_id is not None:
            client.set_terminated(row.run_id, status="KILLED")


def trial_count(spec: SweepSpec) -> int:
    """Trials the sweep runs: its grid points (every choice too, with the grid searcher) times
    ``num_samples``."""
    gridded = ("grid", "choice") if spec.searcher == "grid" else ("grid",)
    return math.prod(len(d.values) for d in spec.dimensions if d.kind in gridded) * \
        spec.num_samples


def _inject_faults(fail_at_epoch: str | None) -> None:
    """Tests only: the sweep driver's :data:`~orchestration.worker.FAIL_AT_EPOCH`, passed on to
    the trial's own Ray Train run (a trial actor does not share the driver's environment)."""
    if fail_at_epoch:
        os.environ[FAIL_AT_EPOCH] = fail_at_epoch
    else:
        os.environ.pop(FAIL_AT_EPOCH, None)


def _fit(spec: SweepSpec, name: str, root: str, parent: TrackedRun, uri: str,
         max_concurrent: int, resume: bool, progress: bool, command: str | None = None):
    context = {"base": spec.base, "dimensions": [vars(d) for d in spec.dimensions],
               "parent": parent.run_id, "uri": uri, "sweep": name, "command": command,
               "fail_at_epoch": os.environ.get(FAIL_AT_EPOCH)}
    # Tune reserves the driver's share only; the trial's Ray Train run reserves its workers.
    trainable = tune.with_resources(tune.with_parameters(_trial, context=context),
                                    {"CPU": DRIVER_CPU})
    callbacks = [TrialRunStatus(parent.run_id), SweepLedger(parent.run_id)]
    if progress:  # (a restored sweep keeps the callbacks it was started with)
        callbacks.append(SweepProgress(spec, trial_count(spec), parent.run_id))
    if resume and tune.Tuner.can_restore(sweep_dir_of(root, name)):
        tuner = tune.Tuner.restore(sweep_dir_of(root, name), trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        grid_searcher = spec.searcher == "grid"
        tuner = tune.Tuner(
            trainable,
            param_space={d.key: _distribution(d, grid_searcher) for d in spec.dimensions},
            tune_config=_tune_config(spec, max_concurrent),
            run_config=tune.RunConfig(
                name=name, storage_path=root, verbose=0,
                failure_config=tune.FailureConfig(max_failures=0),  # Ray Train retries workers
                callbacks=callbacks),
        )
    return tuner.fit()


def _register_best(spec: SweepSpec, best, parent: TrackedRun, uri: str) -> None:
    """The best trial's model (exported here: the trials export none) as a version of
    ``tracking.register_model`` (default: the sweep file's name), alias ``best``:
    ``models:/NAME@best`` finds it later by name."""
    base = spec.base_config()
    if not base.tracking.log_model:
        return
    name = base.tracking.register_model or Path(spec.source).stem
    trial = TrackedRun(uri, best.run_id)
    if trial.logged_model_id() is None:  # (trials export none: one export, the best's)
        from orchestration.evaluate import open_tracked_model
        from orchestration.recipe import eval_image_size

        found = open_tracked_model(best.run_id, uri)  # (its config and state.pt)
        trial.log_model(found.model, eval_image_size(found.cfg))
    trial.register_model(name, alias="best")
    parent.client.set_tag(parent.run_id, "best_model", f"models:/{name}@best")


def _evaluate_best(spec: SweepSpec, best, best_config: dict[str, Any] | None,
                   uri: str) -> dict[str, float]:
    """``evaluate`` + ``explain`` for the best trial, when the sweep's ``eval`` asks."""
    if best is None or best_config is None or not (spec.final_evaluation or spec.explain_images):
        return {}
    from orchestration.config import from_dict
    from orchestration.evaluate import after_training

    cfg = from_dict(best_config)
    cfg.eval.final_evaluation = spec.final_evaluation
    cfg.eval.explain_images = spec.explain_images
    sc = cfg.scaling
    task = ray.remote(after_training).options(num_cpus=sc.cpus_per_worker,
                                              num_gpus=1 if sc.use_gpu else 0)
    return ray.get(task.remote(best.run_id, uri, cfg))
