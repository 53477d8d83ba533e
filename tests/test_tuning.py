"""``swav-ray tune`` on a real local Ray instance (CPU, gloo) with a real MLflow server: a grid of
concurrent trials nested under one parent run, ASHA stopping a bad trial, resuming a sweep."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestration.config import ConfigError
from orchestration.mlflow_server import serving
from orchestration.preflight import load_experiment
from orchestration.sweep import load_sweep
from orchestration.tracking import TrackedRun, run_of_model
from orchestration.tuning import (
    SweepProgress,
    _tune_config,
    concurrent_trials,
    load_saved_spec,
    run_sweep,
)
from orchestration.worker import FAIL_AT_EPOCH

pytestmark = pytest.mark.slow  # Ray Train/Tune runs end to end (CI runs them all)

EPOCHS = 3
PER_EPOCH = ("loss", "lr", "images_per_s", "epoch_time_s", "prototypes_used", "code_entropy",
             "knn_top1")


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory):
    """One private MLflow server over a temporary SQLite store for the module's sweeps."""
    with serving(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}") as url:
        yield url


def test_the_private_mlflow_server_answers_on_loopback_and_runs_no_job_runner(mlflow_url):
    """MLflow 3 starts a job runner and seven huey consumers with every server by default:
    processes nothing here uses, competing with the trials for a small machine's cores."""
    import urllib.request

    import psutil

    assert mlflow_url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(f"{mlflow_url}/health", timeout=5) as answer:
        assert answer.status == 200
    commands = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
    assert any("mlflow server" in c for c in commands), commands
    assert not any("huey" in c or "_job_runner" in c for c in commands), commands


def sweep(tmp: Path, url: str, search: dict, epochs: int = EPOCHS, **extra) -> str:
    overrides = {
        "data.limit": 256, "optim.epochs": epochs, "optim.batch_size": 64, "model.width": 8,
        "model.hidden_dim": 32, "model.out_dim": 16, "model.n_prototypes": 20,
        "swav.freeze_prototypes_iters": 2, "eval.knn_k": 10, "optim.warmup_epochs": 1,
        "scaling.num_workers": 1, "scaling.storage_path": str(tmp / "runs"),
        "tracking.tracking_uri": url, "tracking.log_model": False,  # faster trials
        **extra.pop("overrides", {}),
    }
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump({"experiment": "default", "overrides": overrides,
                                    "search": search, **extra}, sort_keys=False))
    return str(path)


def children(client: MlflowClient, parent_id: str) -> dict[str, object]:
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.data.tags["trial_id"]: r for r in runs}


def steps(client: MlflowClient, run_id: str, key: str = "loss") -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_a_grid_of_concurrent_trials_is_one_parent_run_with_a_child_per_trial(
        ray_local, mlflow_url, tmp_path):
    # Two trials, side by side (grids of several knobs multiply, as Ray Tune's grid_search does:
    # the laptop sweep of BENCHMARKS.md ran 2 x 2 x 2 = 8 trials).
    spec = load_sweep(sweep(tmp_path, mlflow_url, {"model.n_prototypes": {"grid": [10, 20]},
                                                   "swav.epsilon": {"grid": [0.05]}},
                            epochs=2, scheduler="fifo", overrides={
                                "tracking.log_model": True,
                                "tracking.register_model": "digits-grid"}))
    assert concurrent_trials(spec) == 2  # 3 CPUs, 1 worker + a 0.5-CPU driver per trial
    outcome = run_sweep(spec, name="grid")
    client = MlflowClient(mlflow_url)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "grid"
    assert parent.data.params["search.model.n_prototypes"] == "grid(10, 20)"
    assert parent.data.params["optim.epochs"] == "2"  # the base config
    kids = children(client, outcome.parent_run_id)
    assert len(kids) == 2 and all(r.info.status == "FINISHED" for r in kids.values())
    assert {(r.data.params["model.n_prototypes"], r.data.params["swav.epsilon"])
            for r in kids.values()} == {("10", "0.05"), ("20", "0.05")}
    for run in kids.values():  # same names as a plain run, every epoch exactly once
        for key in PER_EPOCH:
            assert steps(client, run.info.run_id, key) == [0, 1], key
        assert steps(client, run.info.run_id, "knn_top1_random_init") == [0]
    starts = sorted((r.info.start_time, r.info.end_time) for r in kids.values())
    assert any(b[0] < a[1] for a, b in zip(starts, starts[1:]))  # trials ran at the same time

    last = {tid: r.data.metrics["knn_top1"] for tid, r in kids.items()}  # at the last epoch
    best_id = outcome.best.trial_id
    assert last[best_id] == max(last.values())  # (ties on tiny data: any of the best)
    assert outcome.best.metric == pytest.approx(last[best_id])
    assert outcome.best.run_id == kids[best_id].info.run_id
    assert parent.data.tags["best_run_id"] == kids[best_id].info.run_id
    # Its model registered under the name asked for, alias best (the trials register none).
    assert parent.data.tags["best_model"] == "models:/digits-grid@best"
    assert run_of_model("models:/digits-grid@best", mlflow_url) == outcome.best.run_id
    (version,) = client.search_model_versions("name = 'digits-grid'")
    best_run = client.get_run(outcome.best.run_id)
    assert version.source == f"models:/{best_run.outputs.model_outputs[-1].model_id}"  # linked
    assert all(not client.get_run(r.info.run_id).outputs.model_outputs  # one export: the best's
               for tid, r in kids.items() if tid != best_id)
    # Registering the same run again (a resumed sweep) keeps its version.
    assert TrackedRun(mlflow_url, outcome.best.run_id).register_model(
        "digits-grid", alias="best") == f"models:/digits-grid/{version.version}"
    assert len(client.search_model_versions("name = 'digits-grid'")) == 1
    assert parent.data.metrics["best_knn_top1"] == pytest.approx(last[best_id])
    assert parent.data.params["best.model.n_prototypes"] == kids[best_id].data.params[
        "model.n_prototypes"]
    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id, "sweep")}
    assert {"sweep/trials.csv", "sweep/best_config.yaml", "sweep/metric_by_knob.png",
            "sweep/learning_curves.png"} <= artifacts
    csv = Path(client.download_artifacts(outcome.parent_run_id, "sweep/trials.csv", str(tmp_path)))
    assert len(csv.read_text().strip().splitlines()) == 1 + 2
    best_file = client.download_artifacts(outcome.parent_run_id, "sweep/best_config.yaml",
                                          str(tmp_path))
    best = load_experiment(best_file)  # swav-ray train takes it as is
    assert best.model.n_prototypes == int(kids[best_id].data.params["model.n_prototypes"])
    assert best.swav.epsilon == float(kids[best_id].data.params["swav.epsilon"])
    assert best.scaling.run_name is None and best.eval.final_evaluation  # the base's evaluation


def _cpus_come_back(ray, free_before: float, within_s: float = 60.0) -> None:
    """At least ``free_before`` CPUs are free again (Ray reports releases with a delay)."""
    deadline = time.monotonic() + within_s
    while True:
        free = ray.available_resources().get("CPU", 0.0)
        if free >= free_before:
            return
        assert time.monotonic() < deadline, f"{free_before - free:g} CPUs still held"
        time.sleep(0.5)


def test_asha_stops_a_bad_trial_and_a_resumed_sweep_reruns_only_the_unfinished(
        ray_local, mlflow_url, tmp_path, monkeypatch):
    """Three trials, one at a time; each would die for good at its third epoch (the first
    time). The loss starts near ln K, so after one epoch K=200 and K=300 are far worse than
    K=10: ASHA stops them (KILLED), and each gives back every CPU (workers, placement group,
    driver), so the trial waiting behind a stopped one runs (a reused Tune actor hung there).
    The resumed sweep finishes the one that died from its last checkpoint into the same MLflow
    run and leaves the stopped ones alone."""
    free_before = ray_local.available_resources().get("CPU", 0.0)
    spec = load_sweep(sweep(tmp_path, mlflow_url, {"model.n_prototypes": {"grid": [10, 200, 300]}},
                            metric="loss", max_concurrent_trials=1,
                            scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 3},
                            overrides={"scaling.max_failures": 0}))
    monkeypatch.setenv(FAIL_AT_EPOCH, "2")
    first = run_sweep(spec, name="asha")
    rows = first.rows  # in trial order
    assert [r.values["model.n_prototypes"] for r in rows] == [10, 200, 300]
    assert [r.status for r in rows] == ["error", "stopped", "stopped"]
    # Why the first one failed, as the console prints it (the worker the test killed).
    assert rows[0].error.startswith("rank ") and "WorkerHealthCheckFailed" in rows[0].error, \
        rows[0].error
    for row in rows[1:]:
        assert row.error is None
        assert row.epochs == 1 and row.metric > math.log(100)  # stopped for being bad
    _cpus_come_back(ray_local, free_before)  # nothing of the stopped or failed trial lingers
    client = MlflowClient(mlflow_url)
    kids = children(client, first.parent_run_id)
    assert [kids[r.trial_id].info.status for r in rows] == ["FAILED", "KILLED", "KILLED"]
    stopped = {r.trial_id: (steps(client, kids[r.trial_id].info.run_id),
                            sorted(p.name for p in (tmp_path / "runs" / f"asha-{r.trial_id}")
                                   .rglob("*")))
               for r in rows[1:]}

    again = run_sweep(load_saved_spec(str(tmp_path / "runs"), "asha"), name="asha", resume=True)
    assert again.parent_run_id == first.parent_run_id
    assert client.get_run(again.parent_run_id).info.status == "FINISHED"
    kids = children(client, first.parent_run_id)
    assert len(kids) == 3 and all(r.info.status != "RUNNING" for r in kids.values())
    # K=10 resumes from its checkpoint and finishes: every epoch logged exactly once.
    assert again.rows[0].status == "finished"
    assert kids[rows[0].trial_id].info.status == "FINISHED"
    assert steps(client, kids[rows[0].trial_id].info.run_id) == list(range(EPOCHS))
    # The stopped one is not re-run: its run and files are untouched.
    assert [r.status for r in again.rows[1:]] == ["stopped", "stopped"]
    assert {r.trial_id: (steps(client, kids[r.trial_id].info.run_id),
                         sorted(p.name for p in (tmp_path / "runs" / f"asha-{r.trial_id}")
                                .rglob("*")))
            for r in rows[1:]} == stopped
    assert again.best.trial_id == rows[0].trial_id  # K=10: the lowest loss
    with pytest.raises(ConfigError, match="already exists"):
        run_sweep(spec, name="asha")


def test_an_interrupted_sweep_exits_non_zero_and_resumes_into_the_same_child_run(
        ray_local, mlflow_url, tmp_path):
    """The real `swav-ray tune`, interrupted (SIGINT) as its trial starts, before the trial's
    first result (its missing result broke the table): the table so far, exit 1, the parent and
    the trial KILLED, no best. The resumed sweep finishes the trial into the same MLflow run:
    one child run per trial, every epoch logged once."""
    import os
    import signal
    import subprocess
    import sys

    path = sweep(tmp_path, mlflow_url, {"model.n_prototypes": {"grid": [10]}}, epochs=2,
                 scheduler={"name": "fifo"}, eval={"final_evaluation": False, "explain_images": 0})
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    proc = subprocess.Popen([sys.executable, "-m", "orchestration.cli", "tune", path, "--name",
                             "cut"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list((tmp_path / "runs").glob("cut-*/mlflow_run_id")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    assert err.strip().splitlines()[-1] == (
        "swav-ray: sweep interrupted: 1 of 1 trials did not finish; the sweep's run and theirs "
        "are marked KILLED; continue with swav-ray tune --resume cut")
    table = [line.split() for line in out.splitlines()
             if line.split()[-1:] in (["finished"], ["stopped"], ["unfinished"], ["error"])]
    assert [(row[1], row[-1]) for row in table] == [("10", "unfinished")], out
    assert "best:" not in out
    client = MlflowClient(mlflow_url)
    (parent,) = client.search_runs([client.get_experiment_by_name("swav-ray").experiment_id],
                                   filter_string="tags.mlflow.runName = 'cut'")
    assert parent.info.status == "KILLED" and "best_trial_id" not in parent.data.tags
    kids = children(client, parent.info.run_id)
    assert [r.info.status for r in kids.values()] == ["KILLED"]
    (cut_id, cut), = kids.items()
    # MLflow's Source column: the command that made the sweep, on its run and each trial's.
    assert parent.data.tags["mlflow.source.name"] == f"swav-ray tune {path} --name cut"
    assert cut.data.tags["mlflow.source.name"] == parent.data.tags["mlflow.source.name"]

    again = run_sweep(load_saved_spec(str(tmp_path / "runs"), "cut"), name="cut", resume=True)
    assert again.unfinished == 0 and [r.status for r in again.rows] == ["finished"]
    kids = children(client, parent.info.run_id)
    assert list(kids) == [cut_id] and kids[cut_id].info.run_id == cut.info.run_id
    assert kids[cut_id].info.status == "FINISHED"
    assert steps(client, cut.info.run_id) == [0, 1]
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert again.best.trial_id == cut_id


def test_a_trial_larger_than_the_cluster_is_refused_before_any_run(ray_local, mlflow_url,
                                                                   tmp_path):
    spec = load_sweep(sweep(tmp_path, mlflow_url, {"swav.epsilon": {"grid": [0.03]}},
                            overrides={"scaling.num_workers": 3}))
    with pytest.raises(ConfigError, match=r"^scaling.num_workers: a trial needs 3.5 CPU \(3 "
                                          r"workers \+ its driver\), the Ray cluster has 3"):
        run_sweep(spec, name="too-big")
    client = MlflowClient(mlflow_url)
    experiment = client.get_experiment_by_name("swav-ray")
    names = {r.info.run_name for r in client.search_runs([experiment.experiment_id])}
    assert "too-big" not in names and not (tmp_path / "runs" / "too-big").exists()


def test_runs_of_trials_tune_never_ended_are_not_left_running(mlflow_url):
    """After an interrupted sweep (or a failure of the sweep itself) every child still RUNNING
    is ended KILLED; children that ended keep their status."""
    from orchestration.tuning import end_trial_runs

    client = MlflowClient(mlflow_url)
    experiment = client.create_experiment("interrupted")
    parent = client.create_run(experiment).info.run_id
    kids = {tid: client.create_run(experiment, tags={"mlflow.parentRunId": parent,
                                                     "trial_id": tid}).info.run_id
            for tid in ("t0", "t1", "t2")}
    client.set_terminated(kids["t0"], "FINISHED")
    end_trial_runs(mlflow_url, parent, "FAILED", "t1")
    assert client.get_run(kids["t1"]).info.status == "FAILED"
    assert client.get_run(kids["t2"]).info.status == "RUNNING"
    end_trial_runs(mlflow_url, parent, "KILLED")
    assert [client.get_run(kids[t]).info.status for t in ("t0", "t1", "t2")] == [
        "FINISHED", "FAILED", "KILLED"]
    assert client.get_run(parent).info.status == "RUNNING"  # the parent is the sweep's to end


def test_asha_compares_budgeted_trials_at_equal_training_time(tmp_path):
    """Epochs without a budget; with optim.time_budget_s (base or searched) the run's clock,
    training_s, with the grace period in seconds (an eighth of the largest budget by default)."""
    def asha(search: dict, overrides: dict, scheduler: dict | None = None):
        sweep = tmp_path / "sweep.yaml"
        sweep.write_text(yaml.safe_dump({
            "experiment": "default", "overrides": {"optim.epochs": 12, **overrides},
            "search": search, "scheduler": scheduler or {"name": "asha"}}))
        s = _tune_config(load_sweep(str(sweep)), 1).scheduler
        return s._time_attr, s._max_t, s._brackets[0]._rungs[-1][0]  # (the lowest rung last)

    eps = {"swav.epsilon": {"grid": [0.03, 0.05]}}
    assert asha(eps, {}) == ("epochs_done", 12, 1)
    assert asha(eps, {"optim.time_budget_s": 120}) == ("training_s", 120, 15)
    assert asha({"optim.time_budget_s": {"grid": [60, 240]}}, {}) == ("training_s", 240, 30)
    assert asha(eps, {"optim.time_budget_s": 120},
                {"name": "asha", "grace_period": 20, "reduction_factor": 3}) == \
        ("training_s", 120, 20)


def test_the_sweep_bar_counts_epochs_or_with_budgets_seconds_of_training(tmp_path):
    from types import SimpleNamespace

    def spec_with(overrides: dict):
        sweep = tmp_path / "sweep.yaml"
        sweep.write_text(yaml.safe_dump({"experiment": "default",
                                         "overrides": {"optim.epochs": 12, **overrides},
                                         "search": {"swav.epsilon": {"grid": [0.03, 0.05]}}}))
        return load_sweep(str(sweep))

    trials = [SimpleNamespace(trial_id=t, config={"swav.epsilon": 0.03}, last_result=None)
              for t in "ab"]
    epochs = SweepProgress(spec_with({}), trials=2)
    timed = SweepProgress(spec_with({"optim.time_budget_s": 30}), trials=2)
    for progress in (epochs, timed):
        for trial, done, clock in ((trials[0], 1, 4.0), (trials[1], 1, 5.0), (trials[0], 2, 9.5)):
            progress.on_trial_result(0, trials, trial, {"epochs_done": done, "training_s": clock,
                                                        "knn_top1": 0.5})
        # The trial's own final report, seen only as its last result when it completes.
        trials[1].last_result = {"epochs_done": 4, "training_s": 29.0, "knn_top1": 0.6}
        progress.on_trial_complete(0, trials, trials[1])
        trials[1].last_result = None
        progress.on_experiment_end(trials)
    assert (epochs.total, epochs.bar.n) == (24, 6)  # 2 trials x 12 epochs; a: 2, b: 4
    assert (timed.total, timed.bar.n) == (60, 38.5)  # 2 x 30 s; a: 9.5 s, b: 29 s
    assert epochs.best == timed.best == 0.6  # the final report's figure counts for the best

