"""Tests for orchestration.metrics: one metric vocabulary for the run, MLflow, Tune and console."""

from __future__ import annotations

from orchestration.metrics import (
    EPOCH_METRICS,
    EVAL_PREFIX,
    LABELLED_METRICS,
    epoch_report,
    evaluation_metrics,
    loggable,
)
from swav.engine import EpochStats

STATS = EpochStats(epoch=4, loss=5.25, lr=0.3, images=1280, seconds=2.0, images_per_s=640.0,
                   prototypes_used=87, code_entropy=4.1, queue_in_use=False, corrupt_images=2)


def test_an_epoch_report_names_every_figure_of_the_vocabulary_and_nothing_else():
    report = epoch_report(STATS, knn_top1=0.91, knn_top1_random_init=0.5, epochs_planned=9,
                          training_s=10.5, setup_s=3.25)
    assert set(report) == set(EPOCH_METRICS) | {"epoch", "epochs_done", "epochs_planned"}
    assert report["setup_s"] == 3.25
    # a 0-based step, epochs trained, the run's length as planned, the training clock
    assert (report["epoch"], report["epochs_done"], report["epochs_planned"]) == (4, 5, 9)
    assert report["training_s"] == 10.5
    assert (report["prototypes_used"], report["epoch_time_s"]) == (87, 2.0)


def test_the_knn_figures_and_the_set_up_time_are_reported_only_when_measured():
    report = epoch_report(STATS, training_s=10.5)
    assert set(report) == (set(EPOCH_METRICS) - set(LABELLED_METRICS) - {"setup_s"}
                           | {"epoch", "epochs_done"})


def test_loggable_keeps_the_vocabulary_s_figures_as_floats():
    report = {**epoch_report(STATS, knn_top1=0.91, epochs_planned=9, training_s=10.5),
              "knn_top1_random_init": None, "other": 1}
    logged = loggable(report)
    assert set(logged) == set(EPOCH_METRICS) - {"knn_top1_random_init", "setup_s"}  # no None
    assert all(type(v) is float for v in logged.values()) and logged["corrupt_images"] == 2.0


def test_the_final_evaluation_s_names_are_the_vocabulary_s_with_the_eval_prefix():
    found = {"knn_top1": 0.9, "prototypes_used": 80, "code_entropy": 4.0, "linear_top1": 0.95}
    assert evaluation_metrics(found) == {
        "eval_knn_top1": 0.9, "eval_prototypes_used": 80.0, "eval_code_entropy": 4.0,
        "eval_linear_top1": 0.95}
    renamed = {k[len(EVAL_PREFIX):] for k in evaluation_metrics(found)}
    assert {"knn_top1", "prototypes_used", "code_entropy"} <= renamed & set(EPOCH_METRICS)


def test_every_figure_has_a_description_and_a_direction_tune_can_use():
    assert all(text and mode in ("min", "max") for text, mode in EPOCH_METRICS.values())
    assert set(LABELLED_METRICS) <= set(EPOCH_METRICS)
