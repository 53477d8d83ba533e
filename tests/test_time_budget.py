"""Tests for orchestration.time_budget: planning whole epochs into a wall-clock budget and fitting
the warmup + cosine schedule to the plan (a whole run with a budget: tests/test_train.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from orchestration.time_budget import TrainingClock, fit_schedule, plan_epochs, plan_run
from swav.optim import build_scheduler, warmup_cosine


def clock_of(*seconds: float) -> TrainingClock:
    clock = TrainingClock()
    for value in seconds:
        clock.add_epoch(value, torch.device("cpu"))  # one process: its own time
    return clock


@pytest.mark.parametrize("epochs, expected", [
    ((), 50),  # nothing timed yet: optim.epochs
    ((10.0,), 50),  # the first epoch alone (the run's start-up in it) plans nothing
    ((130.0,), 1),  # unless it spent the budget
    ((8.0, 8.0), 15),  # 104 s left at 8 s an epoch: 13 more
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
    fit_schedule(scheduler, epochs=8, steps_per_epoch=10, warmup_share=5 / 50)
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


def budget_run(most: int, steps: int, budget_s: float) -> tuple[SimpleNamespace, SimpleNamespace]:
    """(optim config, engine) as plan_run reads them: cifar10_wallclock's LARS 2.4 with a tenth
    of ``most`` epochs as warmup, on one parameter."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.4)
    engine = SimpleNamespace(optimizer=optimizer, scheduler=build_scheduler(
        optimizer, total_steps=most * steps, warmup_steps=most // 10 * steps, final_lr=0.0012))
    return SimpleNamespace(time_budget_s=budget_s, epochs=most, warmup_epochs=most // 10), engine


def rates_of_a_run(epoch_seconds: list[float], steps: int = 97, most: int = 400,
                   budget_s: float = 120.0) -> tuple[list[float], int]:
    """The rate of every step of a run whose epochs take ``epoch_seconds``, planned after each
    epoch as the worker plans it (cifar10_wallclock's schedule: LARS 2.4, a tenth as warmup)."""
    optim, engine = budget_run(most, steps, budget_s)
    optimizer = engine.optimizer
    clock, rates = TrainingClock(), []
    planned, _ = plan_run(optim, engine, clock, 0, steps)
    for seconds in epoch_seconds:
        for _ in range(steps):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            engine.scheduler.step()
        clock.add_epoch(seconds, torch.device("cpu"))
        planned, _ = plan_run(optim, engine, clock, clock.epochs, steps)
        if clock.epochs == planned:
            break
    return rates, planned


def test_a_slow_first_epoch_does_not_skip_the_warmup():
    """The first epoch carries the run's start-up (compilation, autotuning): on an H100 with
    crops.compile, cifar10_wallclock's first epoch took 14 s and the next ones 1.9 s. Planned
    from the first epoch alone, the run had 9 epochs, whose warmup (0.9 of an epoch) had
    passed: the second epoch ran at the peak rate 2.4 after one at under 0.06. No step may run
    above the rate that the final plan's schedule gives it, up to the end of its warmup."""
    rates, planned = rates_of_a_run([14.0] + [1.875] * 80)
    assert planned == 58 and len(rates) == 58 * 97
    warmup = round(0.1 * planned * 97)
    final = [warmup_cosine(s, planned * 97, warmup, 2.4, 0.0012) for s in range(warmup)]
    assert all(r <= f + 1e-9 for r, f in zip(rates, final)), max(rates[:warmup])
    assert rates[-1] == pytest.approx(0.0012, rel=0.05) and max(rates) > 2.3  # the whole cosine


def test_a_budget_past_optim_epochs_is_told_once_a_pace_is_known():
    """plan_run's second answer (the worker warns on it, once): the budget fits more epochs than
    optim.epochs allows; not after the first epoch alone, which plans nothing."""
    optim, engine = budget_run(most=20, steps=10, budget_s=120.0)
    clock = TrainingClock()
    assert plan_run(optim, engine, clock, 0, 10) == (20, False)
    clock.add_epoch(5.0, torch.device("cpu"))
    assert plan_run(optim, engine, clock, 1, 10) == (20, False)
    clock.add_epoch(1.0, torch.device("cpu"))  # 114 s left at 1 s an epoch: 116 in all
    assert plan_run(optim, engine, clock, 2, 10) == (20, True)
    short = budget_run(most=200, steps=10, budget_s=120.0)
    assert plan_run(short[0], short[1], clock, 2, 10) == (116, False)
