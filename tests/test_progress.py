"""Tests for orchestration.progress: the per-epoch line and the driver's console, fed through a
real ProgressBoard actor on a local Ray instance."""

from __future__ import annotations

import io

import ray

from orchestration.progress import ConsoleProgress, ProgressBoard, StepPoster, epoch_line


def test_an_epoch_line_names_the_epoch_of_the_total_and_the_vocabulary_s_figures():
    report = {"epoch": 2, "loss": 4.21349, "knn_top1": 0.91234, "prototypes_used": 45.0,
              "code_entropy": 3.5, "images_per_s": 851.4, "lr": 0.0312, "epoch_time_s": 12.34,
              "corrupt_images": 0.0}
    assert epoch_line(report, 12) == ("epoch 3/12  loss 4.2135  knn_top1 0.9123  "
                                      "prototypes_used 45  code_entropy 3.5000  "
                                      "images_per_s 851  lr 0.0312  (12.3 s)")
    assert epoch_line({"epoch": 0, "loss": 8.0}, 1) == "epoch 1/1  loss 8.0000"
    # A worker's first epoch says how long it took to set up (data, model, compiling).
    first = {"epoch": 0, "loss": 8.0, "epoch_time_s": 1.04, "setup_s": 41.26}
    assert epoch_line(first, 3) == "epoch 1/3  loss 8.0000  (1.0 s, after 41.3 s of set-up)"


def test_the_console_prints_each_posted_epoch_once_in_order(ray_local):
    board = ProgressBoard.remote()
    out = io.StringIO()  # not a terminal: no bar, only the lines
    with ConsoleProgress(board, epochs=3, interval=0.05, file=out) as console:
        poster = StepPoster(board, epoch=0, total=4, first_iteration=0, images_per_step=32,
                            interval=0.0)
        for it in range(1, 5):
            poster(it, 5.0 - it)
        ray.get(board.post_epoch.remote({"epoch": 0, "loss": 4.5}))
        ray.get(board.post_epoch.remote({"epoch": 1, "loss": 4.0}))
        # A time budget's run plans its length after each epoch: the console follows the plan.
        ray.get(board.post_epoch.remote({"epoch": 2, "loss": 3.5, "epochs_planned": 7}))
        step, _ = ray.get(board.read.remote(0))
    assert step["epoch"] == 0 and step["done"] == 4 and step["loss"] == 1.0
    assert out.getvalue().splitlines() == ["epoch 1/3  loss 4.5000", "epoch 2/3  loss 4.0000",
                                           "epoch 3/7  loss 3.5000"]
    assert console.seen == 3 and console.bar.total == 7
