"""What Tune does not say after a sweep: whether it was interrupted, which trials the interruption
cut short, and the config of a trial that had not reported yet.

On Ctrl-C (SIGINT) Tune stops its loop, saves the sweep's state (the running trials as running,
so that ``--resume`` continues them) and then stops every trial the way a scheduler stops one:
its ``ResultGrid`` shows the cut trials as ended, and a trial stopped mid-epoch looks like one
that ASHA stopped. The ledger, a Tune callback in the driver, sees the signal and the trials
running at that moment; a trial that had not reported has no ``result.json`` and so no config in
the grid, which the ledger keeps from Tune's own trial objects.
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from ray import tune

__all__ = ["Ledger", "SweepLedger", "ledger_of"]


@dataclass
class Ledger:
    interrupted: bool = False
    running: set[str] = field(default_factory=set)
    cut_short: set[str] = field(default_factory=set)  # running when the sweep was interrupted
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)


# parent run id -> its ledger (a restored sweep's callbacks are copies from its first start, so
# the state lives here, in the driver process, not in the callback object).
_LEDGERS: dict[str, Ledger] = {}


def ledger_of(parent_run_id: str) -> Ledger:
    return _LEDGERS.setdefault(parent_run_id, Ledger())


class SweepLedger(tune.Callback):
    """Keeps the :class:`Ledger` of the sweep whose parent run is ``parent_run_id``."""

    def __init__(self, parent_run_id: str) -> None:
        self.parent = parent_run_id

    def setup(self, **info) -> None:
        """Wrap Tune's SIGINT handler (installed before its callbacks are set up)."""
        if threading.current_thread() is not threading.main_thread():
            return
        tune_handler = signal.getsignal(signal.SIGINT)
        ledger = ledger_of(self.parent)

        def interrupted(signum, frame):
            if not ledger.interrupted:
                ledger.interrupted = True
                ledger.cut_short |= ledger.running
                sys.stderr.write("\nswav-ray: interrupted: stopping the trials and saving the "
                                 "sweep's state (Ctrl-C again to skip that)\n")
            if callable(tune_handler):
                tune_handler(signum, frame)
            else:
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, interrupted)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        ledger = ledger_of(self.parent)
        ledger.running.add(trial.trial_id)
        ledger.configs[trial.trial_id] = dict(trial.config)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        ledger_of(self.parent).running.discard(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        ledger_of(self.parent).running.discard(trial.trial_id)

    def on_experiment_end(self, trials, **info) -> None:
        ledger = ledger_of(self.parent)
        for trial in trials:
            ledger.configs.setdefault(trial.trial_id, dict(trial.config))
