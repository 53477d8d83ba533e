"""Tests for orchestration.time_budget: planning whole epochs into a wall-clock budget and fitting
the warmup + cosine schedule to the plan (a whole run with a budget: tests/test_train.py)."""

from __future__ import annotations

import pytest
import torch

from orchestration.time_budget import TrainingClock, fit_schedule, plan_epochs
from swav.optim import build_scheduler, warmup_cosine


def clock_of(*seconds: float) -> TrainingClock:
    clock = TrainingClock()
    for value in seconds:
        clock.add_epoch(value, torch.device("cpu"))  # one process: its own time
    return clock


@pytest.mark.parametrize("epochs, expected", [
    ((), 50),  # nothing timed yet: optim.epochs
    ((10.0,), 12),  # 110 s left at 10 s an epoch: 11 more
    ((8.0,), 15),  # 112 / 8 = 14 more
    ((30.0, 10.0), 10),  # the first epoch's start-up is left out of the pace: 80 / 10 = 8 more
    ((24.0, 10.0, 10.0, 10.0, 10.0), 11),  # 56 s left: 5.6 epochs, to the nearest: 6 more
    ((10.0,) * 11 + (8.0,), 12),  # 0 s left: none more
    ((10.0,) * 10 + (4.0, 4.0), 13),  # 12 s left at the mean pace (8.9 s): 1.35 -> 1 more
    ((20.0,) * 7, 7),  # past the budget: never fewer than those done
    ((1.0,), 50),  # at most optim.epochs
])
def test_the_plan_fills_the_budget_to_the_nearest_whole_epoch(epochs, expected):
    assert plan_epochs(len(epochs), clock_of(*epochs), budget_s=120.0, most=50) == expected


def test_in_the_last_quarter_of_its_plan_the_plan_stays_unless_the_budget_changes():
    clock = clock_of(*(10.0,) * 8)  # 8 of a 10-epoch plan
    clock.planned, clock.budget_s = 10, 120.0
    clock.add_epoch(30.0, torch.device("cpu"))  # a slow epoch in the last quarter
    assert plan_epochs(9, clock, 120.0, 50) == 10  # no late jump of the rate
    assert plan_epochs(9, clock, 240.0, 50) == 19  # a larger budget (a resume): 130 s / 12.5 s
    early = clock_of(10.0, 10.0, 30.0)  # 3 of 12: planned again from the pace (20 s)
    early.planned, early.budget_s = 12, 120.0
    assert plan_epochs(3, early, 120.0, 50) == 7  # 70 s left at 20 s: 3.5, to the nearest 4 more


def test_a_run_never_stops_under_a_schedule_that_has_not_ended():
    clock = clock_of(10.0, 10.0, 10.0, 10.0, 40.0, 40.0)  # slower at once: 120 s spent
    clock.planned, clock.budget_s = 12, 120.0  # the last epoch ran under a 12-epoch plan
    assert plan_epochs(6, clock, 120.0, 50) == 7  # one more epoch, fitted to end
    clock.planned = 6  # it ran under a plan that ended with it: stop
    assert plan_epochs(6, clock, 120.0, 50) == 6


def test_the_fitted_schedule_is_the_one_of_a_run_planned_that_long_from_the_start():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = build_scheduler(optimizer, total_steps=50 * 10, warmup_steps=5 * 10,
                                final_lr=0.01)
    for _ in range(37):  # 3.7 epochs of 10 steps under the first plan (50 epochs)
        optimizer.step()
        scheduler.step()
    fit_schedule(scheduler, optimizer, epochs=8, steps_per_epoch=10, warmup_share=5 / 50)
    assert (scheduler.total_steps, scheduler.warmup_steps) == (80, 8)
    rates = []
    for step in range(37, 80):
        rates.append(optimizer.param_groups[0]["lr"])  # the rate this step runs at
        assert rates[-1] == pytest.approx(warmup_cosine(step, 80, 8, 2.0, 0.01), abs=1e-12)
        optimizer.step()
        scheduler.step()
    assert rates[0] > rates[-1] > 0.01 and optimizer.param_groups[0]["lr"] == 0.01


def test_the_clock_counts_epochs_and_survives_a_checkpoint():
    clock = clock_of(3.0, 2.5, 1.5)
    assert (clock.trained_s, clock.epochs, clock.first_s, clock.pace) == (7.0, 3, 3.0, 2.0)
    assert TrainingClock.from_state(clock.state_dict()) == clock
    assert TrainingClock.from_state(None) == TrainingClock()  # a checkpoint from before budgets
