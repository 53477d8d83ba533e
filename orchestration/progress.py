"""The console of a training run: one progress bar and one line per epoch, drawn by the driver.

Rank 0 posts its step count and loss (about twice a second) and each epoch's report to a small
Ray actor, :class:`ProgressBoard`; :class:`ConsoleProgress` on the driver polls it and draws a
tqdm bar (epoch x/N, loss, images/s, ETA; on a terminal only) and, per epoch, one line of the
metric vocabulary. Worker output itself is not forwarded at default verbosity.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import ray
from tqdm import tqdm

__all__ = ["ConsoleProgress", "ProgressBoard", "epoch_line"]

# The per-epoch line: these names of the metric vocabulary, in this order, when reported.
LINE_METRICS = ("loss", "knn_top1", "prototypes_used", "code_entropy", "images_per_s", "lr")


@ray.remote(num_cpus=0)
class ProgressBoard:
    """What rank 0 has posted: its latest step and the epoch reports not yet read."""

    def __init__(self) -> None:
        self.step: dict[str, Any] | None = None
        self.epochs: list[dict[str, Any]] = []

    def post_step(self, step: dict[str, Any]) -> None:
        self.step = step

    def post_epoch(self, report: dict[str, Any]) -> None:
        self.epochs.append(report)

    def read(self, seen: int) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        return self.step, self.epochs[seen:]


def epoch_line(report: dict[str, Any], epochs: int) -> str:
    """``epoch 3/12  loss 4.2130  knn_top1 0.912  ...  (12.3 s)``."""
    parts = [f"epoch {int(report['epoch']) + 1}/{epochs}"]
    for name in LINE_METRICS:
        value = report.get(name)
        if value is None:
            continue
        if name in ("prototypes_used", "images_per_s"):
            parts.append(f"{name} {value:.0f}")
        elif name == "lr":
            parts.append(f"{name} {value:.3g}")
        else:
            parts.append(f"{name} {value:.4f}")
    if report.get("epoch_time_s") is not None:
        setup = report.get("setup_s")
        after = "" if setup is None else f", after {setup:.1f} s of set-up"
        parts.append(f"({report['epoch_time_s']:.1f} s{after})")
    return "  ".join(parts)


class ConsoleProgress:
    """``with ConsoleProgress(board, epochs): ...`` draws until the block ends."""

    def __init__(self, board, epochs: int, interval: float = 0.5, file=None) -> None:
        self.board, self.epochs, self.interval = board, epochs, interval
        self.file = file or sys.stderr
        self.seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.bar = tqdm(total=epochs, file=self.file, disable=not self.file.isatty(),
                        bar_format="{desc} |{bar}| [{elapsed}<{remaining}]{postfix}",
                        desc=f"epoch 0/{epochs}", dynamic_ncols=True, leave=False)

    def __enter__(self) -> ConsoleProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll()  # the last epochs' lines
        self.bar.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def _poll(self) -> None:
        try:
            step, reports = ray.get(self.board.read.remote(self.seen), timeout=5)
        except Exception:  # the board went with its job, or is slow: keep what was drawn
            return
        for report in reports:
            self.seen += 1
            self._replan(report.get("epochs_planned", self.epochs))
            self.bar.write(epoch_line(report, self.epochs), file=self.file)
        if step is not None:
            epoch, done, total = step["epoch"], step["done"], max(step["total"], 1)
            self.bar.set_description_str(f"epoch {epoch + 1}/{self.epochs}", refresh=False)
            self.bar.set_postfix_str(f"loss {step['loss']:.4f}, {step['images_per_s']:.0f} "
                                     f"images/s", refresh=False)
            self.bar.n = min(epoch + done / total, self.epochs)
            self.bar.refresh()

    def _replan(self, epochs: int) -> None:
        """A time budget's run plans its length after every epoch: the bar follows."""
        if epochs != self.epochs:
            self.epochs = self.bar.total = epochs


class StepPoster:
    """Rank 0's side: posts the step at most every ``interval`` seconds and at the epoch's end
    (``float(loss)`` waits for the device, so not every step)."""

    def __init__(self, board, epoch: int, total: int, first_iteration: int, images_per_step: int,
                 interval: float = 0.5) -> None:
        self.board, self.epoch, self.total = board, epoch, total
        self.first, self.images_per_step, self.interval = first_iteration, images_per_step, interval
        self.start = self.last = time.perf_counter()

    def __call__(self, iteration: int, loss) -> None:
        done = iteration - self.first  # the engine counts the step before calling back
        now = time.perf_counter()
        if now - self.last < self.interval and done < self.total:
            return
        self.last = now
        rate = done * self.images_per_step / max(now - self.start, 1e-9)
        self.board.post_step.remote({"epoch": self.epoch, "done": done, "total": self.total,
                                     "loss": float(loss), "images_per_s": rate})
