"""Tests for orchestration.sweep_report: the best trial, the trials CSV, the best config as
``swav-ray train`` takes it, why a trial failed (the console table: tests/test_cli.py; a whole
sweep: tests/test_tuning.py)."""

from __future__ import annotations

import csv
import io

import pandas as pd

from orchestration.preflight import load_experiment
from orchestration.sweep import Dimension, SweepSpec
from orchestration.sweep_report import (
    TrialRow,
    _curve,
    _trial_id_from_path,
    best_config_tree,
    best_row,
    error_line,
    trials_csv,
)

SPEC = SweepSpec(base={"eval": {"knn_k": 7}},
                 dimensions=[Dimension("swav.epsilon", "grid", [0.03, 0.05])])


def row(trial: str, metric: float | None, status: str = "finished", **extra) -> TrialRow:
    return TrialRow(trial, f"run-{trial}", {"swav.epsilon": 0.05}, metric, 3, 3, status, {},
                    **extra)


def test_the_best_trial_follows_the_mode_and_never_is_an_errored_or_unscored_one():
    rows = [row("a", 0.80), row("b", 0.95, "error"), row("c", None), row("d", 0.60, "stopped")]
    assert best_row(rows, "max").trial_id == "a"  # b errored, c has no figure
    assert best_row(rows, "min").trial_id == "d"  # a stopped trial counts at its last epoch
    assert best_row([row("e", None), row("f", 0.9, "error")], "max") is None


def test_a_trial_an_interruption_cut_short_is_unfinished_and_never_the_best():
    """Tune ends the trials it interrupts as a scheduler ends the ones it stops: the ledger
    (what ran at the interruption, the configs of trials with no result yet) tells them apart."""
    from types import SimpleNamespace

    from orchestration.sweep_ledger import Ledger
    from orchestration.sweep_report import trial_rows

    client = SimpleNamespace(get_run=lambda _: SimpleNamespace(info=SimpleNamespace(
        experiment_id="0")), search_runs=lambda *a, **k: [])
    spec = SweepSpec(base={"optim": {"epochs": 4, "warmup_epochs": 1}}, dimensions=SPEC.dimensions)

    def result(trial: str, epochs: int, metric: float | None, config: bool = True):
        metrics = {"epochs_done": epochs, "knn_top1": metric} if epochs else None
        return SimpleNamespace(metrics=metrics, error=None, metrics_dataframe=None,
                               path=f"/s/_trial_{trial}_0_x", config={"swav.epsilon": 0.03}
                               if config else None)

    grid = [result("aaaaa_00000", 1, 0.5), result("aaaaa_00001", 3, 0.9),
            result("aaaaa_00002", 0, None, config=False)]
    ledger = Ledger(interrupted=True, cut_short={"aaaaa_00001", "aaaaa_00002"},
                    configs={"aaaaa_00002": {"swav.epsilon": 0.05}})
    rows = trial_rows(grid, spec, client, "parent", ledger)
    assert [(r.status, r.values["swav.epsilon"]) for r in rows] == [
        ("stopped", 0.03), ("unfinished", 0.03), ("unfinished", 0.05)]
    assert best_row(rows, "max").trial_id == "aaaaa_00000"  # not the cut one's 0.9
    uninterrupted = trial_rows(grid[:2], spec, client, "parent")
    assert [r.status for r in uninterrupted] == ["stopped", "stopped"]


def test_the_trials_csv_has_a_row_per_trial_with_its_swept_values_and_status():
    rows = [row("a", 0.8), row("b", None, "error")]
    table = list(csv.reader(io.StringIO(trials_csv(rows, SPEC))))
    assert table == [["trial_id", "run_id", "swav.epsilon", "knn_top1", "epochs", "status"],
                     ["a", "run-a", "0.05", "0.8", "3", "finished"],
                     ["b", "run-b", "0.05", "", "3", "error"]]


def test_the_best_config_gets_a_new_run_name_and_the_base_s_evaluation_settings():
    trial_tree = load_experiment(None, ["scaling.run_name=trial-7", "eval.knn_k=3",
                                    "eval.final_evaluation=false"]).to_dict()
    best = TrialRow("a", "r", {}, 0.9, 3, 3, "finished", trial_tree)
    tree = best_config_tree(SPEC, best)
    assert tree["scaling"]["run_name"] is None and tree["eval"]["knn_k"] == 7
    assert best.config["scaling"]["run_name"] == "trial-7"  # the row itself is left as it was


def test_a_trial_s_id_comes_from_its_folder_name():
    path = "/tmp/ray/sweep/_train_driver_3f2a1_00004_4_swav.epsilon=0.0500_2026-11-27/"
    assert _trial_id_from_path(path) == "3f2a1_00004"
    assert _trial_id_from_path("/elsewhere/odd") == "/elsewhere/odd"


def test_why_a_trial_failed_is_ray_s_kept_cause_else_the_error_s_first_line():
    class TrainingFailed(Exception):  # Ray keeps a trial's original error as `cause`
        def __init__(self, cause):
            super().__init__("Training failed due to worker errors.\n(long traceback)")
            self.cause = cause

    assert error_line(None) is None
    assert error_line(TrainingFailed("data: 9 of 64 images failed to decode")) == \
        "data: 9 of 64 images failed to decode"
    nested = TrainingFailed(TrainingFailed(ValueError("swav.epsilon: must be > 0\nmore")))
    assert error_line(nested) == "swav.epsilon: must be > 0"
    assert error_line(RuntimeError("")) == "RuntimeError"


def test_a_learning_curve_skips_epochs_without_the_metric():
    frame = pd.DataFrame({"epoch": [0, 1, 2, 3], "knn_top1": [0.5, None, 0.7, float("nan")]})
    assert _curve(frame, "knn_top1") == [(0, 0.5), (2, 0.7)]
    assert _curve(frame, "loss") == [] and _curve(None, "knn_top1") == []
