"""The metric vocabulary: per-epoch names as a run reports them, and as MLflow, Ray Tune and the
console see them (one name per figure everywhere)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (the Ray Train controller imports this module; it never trains)
    from swav.engine import EpochStats

__all__ = ["EPOCH_METRICS", "EVAL_PREFIX", "LABELLED_METRICS", "epoch_report",
           "evaluation_metrics", "loggable"]

# name -> (what it is, the better direction); each is an MLflow metric at step = epoch.
EPOCH_METRICS: dict[str, tuple[str, str]] = {
    "loss": ("mean swapped-prediction loss of the epoch", "min"),
    "lr": ("learning rate at the epoch's last step", "max"),
    "images_per_s": ("training images per second, all workers", "max"),
    "epoch_time_s": ("seconds of training in the epoch", "min"),
    "training_s": ("seconds of training so far, the epochs' own (optim.time_budget_s's clock)",
                   "min"),
    "prototypes_used": ("prototypes that won at least one code", "max"),
    "code_entropy": ("entropy of the hard code assignments (nats)", "max"),
    "corrupt_images": ("undecodable images skipped", "min"),
    "knn_top1": ("held-out weighted kNN top-1 of the backbone", "max"),
    "knn_top1_random_init": ("the same at initialisation (epoch 0 only)", "max"),
    "setup_s": ("seconds a worker took before its first epoch: data, model, compiling, a resume's "
                "checkpoint, the random-init kNN (that epoch only)", "min"),
}
# Reported only when the data has a labelled held-out set.
LABELLED_METRICS = ("knn_top1", "knn_top1_random_init")


def epoch_report(stats: EpochStats, knn_top1: float | None = None,
                 knn_top1_random_init: float | None = None,
                 epochs_planned: int | None = None,
                 training_s: float | None = None,
                 setup_s: float | None = None) -> dict[str, Any]:
    """The report of one epoch: ``epoch`` (0-based, the MLflow step), ``epochs_done`` (epochs
    trained so far: Tune's time axis, right after a resume too), ``epochs_planned`` (the run's
    length as planned now: ``optim.epochs``, or what fits ``optim.time_budget_s``) and the
    vocabulary's names (``training_s``: the run's clock, which a budget is spent on)."""
    report: dict[str, Any] = {
        "epoch": stats.epoch,
        "epochs_done": stats.epoch + 1,
        "loss": stats.loss,
        "lr": stats.lr,
        "images_per_s": stats.images_per_s,
        "epoch_time_s": stats.seconds,
        "prototypes_used": stats.prototypes_used,
        "code_entropy": stats.code_entropy,
        "corrupt_images": stats.corrupt_images,
    }
    if epochs_planned is not None:
        report["epochs_planned"] = epochs_planned
    if training_s is not None:
        report["training_s"] = training_s
    if knn_top1 is not None:
        report["knn_top1"] = knn_top1
    if knn_top1_random_init is not None:
        report["knn_top1_random_init"] = knn_top1_random_init
    if setup_s is not None:
        report["setup_s"] = setup_s
    return report


def loggable(report: dict[str, Any]) -> dict[str, float]:
    """The vocabulary's figures of a report, as floats."""
    return {k: float(v) for k, v in report.items() if k in EPOCH_METRICS and v is not None}


# The final evaluation's figures (``swav-ray evaluate`` and after training) are logged once, as
# eval_<name>: never at a step of a per-epoch curve (an MLflow chart would jump back to step 0 and
# the UI's latest value would stop being the last epoch's).
EVAL_PREFIX = "eval_"


def evaluation_metrics(found: dict[str, Any]) -> dict[str, float]:
    """``{"knn_top1": ..}`` -> ``{"eval_knn_top1": ..}``: the vocabulary's names, prefixed."""
    return {EVAL_PREFIX + k: float(v) for k, v in found.items()}
