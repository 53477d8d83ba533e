"""Training for a wall-clock budget (``optim.time_budget_s``): whole epochs, the schedule over them.

A run with a budget trains whole epochs until about ``time_budget_s`` seconds of training have
passed (the epochs' own time: start-up, evaluations and checkpoints do not count), at most
``optim.epochs``.  From the second epoch on, the number of epochs is planned again after every
epoch from the pace so far (each epoch counted at the slowest worker's time, so that every worker
plans the same; the first epoch left out), until the last quarter of the plan; then it stays, and
a run never stops under a schedule that has not ended.

The first epoch carries the run's start-up (compilation, autotuning, the allocator's growth), so
it alone plans nothing: on a GPU it can take several times a later epoch, a plan from it is far
too short, and its warmup would be over before the plan is made.  Until a second epoch is timed
the plan stays ``optim.epochs`` (whose warmup rises slowest), unless the first epoch spent the
budget.

The warmup + cosine schedule is fitted to the plan: the warmup keeps its share
(``warmup_epochs / epochs``) and the learning rate reaches ``final_lr`` at the end, as a schedule
over that many epochs would.

Planning at epoch boundaries, from figures all workers agree on, keeps the workers' learning
rates identical (DDP replicas would drift apart otherwise) and needs no host synchronisation
inside an epoch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["TrainingClock", "fit_schedule", "plan_epochs", "plan_run"]


@dataclass
class TrainingClock:
    """Training time so far and the plan (kept in checkpoints: a resume goes on with both)."""

    trained_s: float = 0.0  # seconds of training, each epoch the slowest worker's
    epochs: int = 0  # epochs timed
    first_s: float = 0.0  # the first epoch's seconds: start-up effects, left out of the pace
    planned: int = 0  # epochs in all, as last planned (0: not yet)
    budget_s: float = 0.0  # the budget that plan was made for

    def add_epoch(self, seconds: float, device: torch.device) -> None:
        """Count an epoch that took ``seconds`` here: the slowest worker's time, on all."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            agreed = torch.tensor([seconds], dtype=torch.float64, device=device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            seconds = float(agreed.item())
        if self.epochs == 0:
            self.first_s = seconds
        self.trained_s += seconds
        self.epochs += 1

    @property
    def pace(self) -> float:
        """Seconds per epoch: the mean of the epochs after the first (the first, until then)."""
        if self.epochs <= 1:
            return self.first_s
        return (self.trained_s - self.first_s) / (self.epochs - 1)

    def state_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> TrainingClock:
        return cls(**state) if state else cls()


def plan_epochs(done: int, clock: TrainingClock, budget_s: float, most: int) -> int:
    """Epochs in all: the ``done`` ones and as many more as fit in what is left of the budget at
    the clock's pace (to the nearest epoch), at most ``most``; ``most`` until an epoch after the
    first is timed (unless the first spent the budget).

    Two rules keep the cosine whole. In the last quarter of a plan for this budget the plan
    stays (no late jumps of the rate). And a plan never ends at once when the epoch that just
    ran followed a longer one: one more epoch, fitted to end, anneals the rate to ``final_lr``
    (so a run may end up to about an epoch past its budget)."""
    if clock.epochs == 0 or clock.pace <= 0:
        return most
    if clock.epochs == 1 and clock.trained_s < budget_s:
        return max(done, most)  # the first epoch alone is no pace (see the module docstring)
    same_budget = clock.planned > 0 and clock.budget_s == budget_s
    if same_budget and done >= 0.75 * clock.planned:
        return clock.planned
    more = max(0, math.floor((budget_s - clock.trained_s) / clock.pace + 0.5))
    planned = max(done, min(most, done + more))
    if planned == done and clock.planned > done:
        planned = done + 1
    return planned


def fit_schedule(scheduler, epochs: int, steps_per_epoch: int, warmup_share: float) -> None:
    """Stretch the per-iteration warmup + cosine (:class:`swav.optim.WarmupCosine`) over
    ``epochs``, the warmup over ``warmup_share`` of them; the next step's rate follows at once."""
    total = max(1, epochs * steps_per_epoch)
    scheduler.resize(total, round(warmup_share * total))


def plan_run(optim: Any, engine: Any, clock: TrainingClock, done: int,
             steps_per_epoch: int) -> tuple[int, bool]:
    """The run's length after ``done`` epochs, and whether the budget fits more epochs than
    ``optim.epochs`` allows (known from the second epoch on): ``optim.epochs`` without a
    budget; with one, the plan, to which the engine's schedule is fitted (the warmup's share is
    ``warmup_epochs / epochs``)."""
    budget = optim.time_budget_s
    if budget is None:
        return optim.epochs, False
    planned = plan_epochs(done, clock, budget, optim.epochs)
    capped = (clock.epochs >= 2 and planned == optim.epochs  # (a pace is known)
              and plan_epochs(done, clock, budget, 2 ** 31) > planned)
    clock.planned, clock.budget_s = planned, budget
    fit_schedule(engine.scheduler, planned, steps_per_epoch,
                 optim.warmup_epochs / optim.epochs)
    return planned, capped

