"""Stopping a Tune trial's Ray Train run when Tune stops the trial, so that its actor can be
reused for the next trial.

A trial is a function running ``TorchTrainer.fit``; Tune can stop it only by killing its actor,
unless it reuses the actor: then it sets the trial session's stop event and waits for the
function to return, which a running Train run never does (its controller even blocks on the
report queue that Tune no longer reads).  So both ends of the run take part:

* :class:`TrialStopWatcher`, in the trial's actor: when Tune sets the stop event, it writes
  ``STOP_FILE`` into the run's folder;
* :class:`StopWhenTuneStops`, a Train callback in the run's controller: from the first report
  on, it looks for that file every second and, once it is there, kills its own controller, and
  with it the worker group (the run's checkpoints stay; a stop keeps none of the epoch it cut).

``fit`` then raises in the trial, which :func:`stopped` recognises: the run ends KILLED and the
trial function returns, within the time Tune waits (raised here to ``THREAD_TIMEOUT_S``).
"""

from __future__ import annotations

import os
import threading
import time

import ray
from ray.train.v2.api.callback import UserCallback

from orchestration.ray_compat import TRIAL_THREAD_TIMEOUT_ENV, trial_stop_event
from orchestration.tracking import read_text, remove_file, write_text

__all__ = ["STOP_FILE", "StopWhenTuneStops", "TrialStopWatcher", "TrialStopped", "stopped"]

STOP_FILE = "tune_stopped"
POLL_S = 1.0
# How long Tune waits for a stopped trial's function before it gives up reusing its actor (and
# fails the trial it meant to start there): the controller's poll, the kill and the run's end.
THREAD_TIMEOUT_S = "120"


class TrialStopped(RuntimeError):
    """The run's Tune trial was stopped (by its scheduler, or the sweep's end)."""


def stopped(run_dir: str) -> bool:
    """Whether Tune stopped the trial that trains in ``run_dir``."""
    return read_text(f"{run_dir}/{STOP_FILE}") is not None


class TrialStopWatcher:
    """In a trial's actor, for the length of its function: writes ``STOP_FILE`` once Tune
    stops the trial (a file left by an earlier stop of the same trial is removed first)."""

    def __init__(self, run_dir: str) -> None:
        self.marker = f"{run_dir}/{STOP_FILE}"
        remove_file(self.marker)
        os.environ[TRIAL_THREAD_TIMEOUT_ENV] = THREAD_TIMEOUT_S  # (read at each reset)
        self._stop = trial_stop_event() or threading.Event()
        self._done = threading.Event()
        threading.Thread(target=self._watch, daemon=True, name="trial-stop").start()

    def _watch(self) -> None:
        while not self._done.wait(0.2):
            if self._stop.is_set():
                try:
                    write_text(self.marker, "stopped by Tune\n")
                    return
                except OSError:  # storage away for a moment: try again
                    time.sleep(POLL_S)

    def done(self) -> None:
        self._done.set()


class StopWhenTuneStops(UserCallback):
    """Train callback: ends its controller (and so the run's workers) once ``STOP_FILE``
    appears in ``run_dir``; watches from the first report on."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self._watching = False

    def __getstate__(self):
        return {"run_dir": self.run_dir, "_watching": False}

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if not self._watching:
            self._watching = True
            threading.Thread(target=self._watch, daemon=True, name="tune-stop").start()

    def _watch(self) -> None:
        controller = ray.get_runtime_context().current_actor
        while not _seen_stopped(self.run_dir):
            time.sleep(POLL_S)
        ray.kill(controller, no_restart=True)


def _seen_stopped(run_dir: str) -> bool:
    """A storage that does not answer for a moment is not a stop."""
    try:
        return stopped(run_dir)
    except OSError:
        return False

