"""Tests for swav.optim (LARS, param groups, optimizer factory, schedules)."""

from __future__ import annotations

import math
from typing import Any, Callable

import pytest
import torch

from swav.optim import (
    LARS,
    build_optimizer,
    build_scheduler,
    param_groups,
    warmup_cosine,
)


def _lars_reference(
    w: torch.Tensor,
    g: torch.Tensor,
    buf: torch.Tensor | None,
    lr: float,
    momentum: float,
    wd: float,
    eta: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hand-written LARS step in float64; returns (new_w, new_buf)."""
    w = w.double()
    g = g.double()
    w_norm = torch.sqrt((w * w).sum())
    g_norm = torch.sqrt((g * g).sum())
    if w_norm > 0 and g_norm > 0:
        local_lr = eta * w_norm / (g_norm + wd * w_norm + eps)
    else:
        local_lr = torch.tensor(1.0, dtype=torch.float64)
    upd = local_lr * (g + wd * w)
    new_buf = upd if buf is None else momentum * buf.double() + upd
    return w - lr * new_buf, new_buf


def _param(values: list[list[float]] | list[float]) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float32))


# --------------------------------------------------------------------- LARS


def test_lars_single_step_matches_hand_computed() -> None:
    w = _param([[1.0, -2.0], [3.0, 0.5]])
    grad = torch.tensor([[0.1, 0.2], [-0.3, 0.4]])
    w0 = w.detach().clone()
    lr, mom, wd, eta, eps = 0.5, 0.9, 1e-2, 0.001, 1e-8
    opt = LARS([w], lr=lr, momentum=mom, weight_decay=wd, trust_coefficient=eta, eps=eps)
    w.grad = grad.clone()
    opt.step()

    expected, _ = _lars_reference(w0, grad, None, lr, mom, wd, eta, eps)
    torch.testing.assert_close(w.detach().double(), expected, rtol=1e-6, atol=1e-9)
    # The update is tiny (trust coefficient 1e-3) but must actually move w.
    assert not torch.equal(w.detach(), w0)

    # Explicit number check: ||w|| = sqrt(14.25), ||g|| = sqrt(0.3).
    wn, gn = math.sqrt(14.25), math.sqrt(0.3)
    local = eta * wn / (gn + wd * wn + eps)
    exp00 = 1.0 - lr * local * (0.1 + wd * 1.0)
    assert w[0, 0].item() == pytest.approx(exp00, rel=1e-6)
    torch.testing.assert_close(
        opt.state[w]["momentum_buffer"].double(),
        local * (grad.double() + wd * w0.double()),
        rtol=1e-6,
        atol=1e-12,
    )


def test_lars_zero_weight_uses_local_lr_one() -> None:
    w = torch.nn.Parameter(torch.zeros(3, 2))
    grad = torch.full((3, 2), 0.5)
    opt = LARS([w], lr=0.1, momentum=0.9, weight_decay=1e-6)
    w.grad = grad.clone()
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((3, 2), -0.05))


def test_lars_excluded_param_is_plain_sgd_without_weight_decay() -> None:
    b = _param([1.0, -2.0, 3.0])
    grad = torch.tensor([0.5, 0.25, -1.0])
    b0 = b.detach().clone()
    lr, mom = 0.1, 0.9
    opt = LARS(
        [{"params": [b], "lars_exclude": True, "weight_decay": 0.5}],
        lr=lr,
        momentum=mom,
        weight_decay=0.5,
    )
    b.grad = grad.clone()
    opt.step()
    # No trust ratio and no weight decay: w - lr * grad.
    torch.testing.assert_close(b.detach(), b0 - lr * grad)
    b.grad = grad.clone()
    opt.step()
    # buf = mom * grad + grad
    torch.testing.assert_close(b.detach(), b0 - lr * grad - lr * (mom * grad + grad))


def test_lars_skips_params_with_none_grad() -> None:
    w = _param([[1.0, 2.0], [3.0, 4.0]])
    frozen = _param([[5.0, 6.0], [7.0, 8.0]])
    frozen0 = frozen.detach().clone()
    opt = LARS([w, frozen], lr=1.0, momentum=0.9, weight_decay=0.1)
    w.grad = torch.ones(2, 2)
    frozen.grad = None
    opt.step()
    torch.testing.assert_close(frozen.detach(), frozen0, rtol=0, atol=0)
    assert frozen not in opt.state or len(opt.state[frozen]) == 0
    assert "momentum_buffer" in opt.state[w]
    # Second step with grad still None: still untouched although w has momentum.
    w.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(frozen.detach(), frozen0, rtol=0, atol=0)
    assert frozen not in opt.state or len(opt.state[frozen]) == 0


def test_lars_momentum_over_two_steps() -> None:
    w = _param([[0.3, -1.2, 2.0]])
    g1 = torch.tensor([[0.5, 0.1, -0.2]])
    g2 = torch.tensor([[-0.4, 0.3, 0.6]])
    lr, mom, wd, eta, eps = 2.0, 0.8, 1e-3, 0.01, 1e-8
    opt = LARS([w], lr=lr, momentum=mom, weight_decay=wd, trust_coefficient=eta, eps=eps)

    ref_w, ref_buf = w.detach().double().clone(), None
    for g in (g1, g2):
        w.grad = g.clone()
        opt.step()
        ref_w, ref_buf = _lars_reference(ref_w, g, ref_buf, lr, mom, wd, eta, eps)
        torch.testing.assert_close(w.detach().double(), ref_w, rtol=1e-6, atol=1e-8)
    assert ref_buf is not None
    torch.testing.assert_close(
        opt.state[w]["momentum_buffer"].double(), ref_buf, rtol=1e-6, atol=1e-9
    )


def test_lars_closure_returns_loss_and_enables_grad() -> None:
    w = torch.nn.Parameter(torch.tensor([[1.0, 2.0]]))
    opt = LARS([w], lr=0.1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None
    assert float(loss.detach()) == pytest.approx(5.0)
    assert w.grad is not None
    torch.testing.assert_close(w.grad, torch.tensor([[2.0, 4.0]]))


# ------------------------------------------------------------- param groups


def test_param_groups_split() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    groups = param_groups(model, weight_decay=1e-4)
    assert len(groups) == 2
    decay, no_decay = groups
    assert decay["weight_decay"] == 1e-4
    assert decay.get("lars_exclude", False) is False
    assert [p.shape for p in decay["params"]] == [torch.Size([3, 4])]
    assert decay["params"][0] is model[0].weight
    assert no_decay["weight_decay"] == 0.0
    assert no_decay["lars_exclude"] is True
    ids = {id(p) for p in no_decay["params"]}
    assert ids == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
    # Every trainable parameter appears exactly once.
    total = sum(p.numel() for g in groups for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters()) == 4 * 3 + 3 + 3 + 3


def test_param_groups_skips_frozen_and_drops_empty() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    model[0].weight.requires_grad_(False)
    groups = param_groups(model, weight_decay=1e-4)
    assert len(groups) == 1
    assert groups[0]["lars_exclude"] is True
    assert len(groups[0]["params"]) == 3

    only_weights = torch.nn.Linear(2, 2, bias=False)
    groups = param_groups(only_weights, weight_decay=0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1


# --------------------------------------------------------- build_optimizer


@pytest.mark.parametrize(
    "name, cls",
    [("sgd", torch.optim.SGD), ("LARS", LARS), ("AdamW", torch.optim.AdamW)],
)
def test_build_optimizer_types_and_groups(name: str, cls: type) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = build_optimizer(model, name, lr=0.3, weight_decay=1e-4, momentum=0.8)
    assert type(opt) is cls
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert all(g["lr"] == 0.3 for g in opt.param_groups)
    if name.lower() != "adamw":
        assert all(g["momentum"] == 0.8 for g in opt.param_groups)
    # One real step must work and change the Linear weight.
    w0 = model[0].weight.detach().clone()
    model(torch.randn(5, 4)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(model[0].weight.detach(), w0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"name": "adam"}, "name"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"weight_decay": -1e-3}, "weight_decay"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
    ],
)
def test_build_optimizer_validation(kwargs: dict[str, Any], field: str) -> None:
    args: dict[str, Any] = {"name": "lars", "lr": 0.1}
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"^{field}: "):
        build_optimizer(torch.nn.Linear(2, 2), **args)


def test_build_optimizer_unknown_name_message() -> None:
    with pytest.raises(ValueError) as exc:
        build_optimizer(torch.nn.Linear(2, 2), "x", lr=0.1)
    assert str(exc.value) == "name: unknown optimizer 'x', expected one of sgd, lars, adamw"


# ---------------------------------------------------------------- schedules


def test_warmup_cosine_values() -> None:
    kw: dict[str, Any] = dict(total_steps=110, warmup_steps=10, base_lr=1.0, final_lr=0.1)
    assert warmup_cosine(0, start_lr=0.2, **kw) == pytest.approx(0.2)
    assert warmup_cosine(0, **kw) == pytest.approx(0.0)
    assert warmup_cosine(5, start_lr=0.2, **kw) == pytest.approx(0.6)
    assert warmup_cosine(10, **kw) == pytest.approx(1.0)
    # Midpoint of cosine: (final + base) / 2.
    assert warmup_cosine(60, **kw) == pytest.approx(0.55)
    # Quarter: final + 0.5 * (base - final) * (1 + cos(pi / 4)).
    assert warmup_cosine(35, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(0.5)))
    assert warmup_cosine(110, **kw) == pytest.approx(0.1)
    assert warmup_cosine(500, **kw) == pytest.approx(0.1)
    # No warmup: starts at base_lr.
    assert warmup_cosine(0, total_steps=10, warmup_steps=0, base_lr=2.0) == pytest.approx(2.0)


def _make_sched(
    lr: float = 0.4,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, Callable[[int], float]]:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    opt = build_optimizer(model, "lars", lr=lr)
    sched = build_scheduler(
        opt, total_steps=20, warmup_steps=4, final_lr=0.01 * lr, start_lr=0.1 * lr
    )

    def expected(step: int) -> float:
        return warmup_cosine(step, 20, 4, base_lr=lr, final_lr=0.01 * lr, start_lr=0.1 * lr)

    return opt, sched, expected


def test_scheduler_matches_warmup_cosine() -> None:
    opt, sched, expected = _make_sched()
    seen = []
    for step in range(25):
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(expected(step), rel=1e-9, abs=1e-12)
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(0.04)
    assert seen[4] == pytest.approx(0.4)
    assert seen[12] == pytest.approx(0.5 * (0.4 + 0.004))
    assert seen[20] == pytest.approx(0.004)
    assert seen[24] == pytest.approx(0.004)


def test_scheduler_state_dict_round_trip() -> None:
    opt, sched, expected = _make_sched()
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt_state = opt.state_dict()
    assert opt.param_groups[0]["lr"] == pytest.approx(expected(7))

    opt2, sched2, _ = _make_sched()
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 7
    assert sched2.get_last_lr()[0] == pytest.approx(expected(7))
    assert opt2.param_groups[0]["lr"] == pytest.approx(expected(7))
    for step in range(8, 14):
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()
        assert opt2.param_groups[0]["lr"] == pytest.approx(expected(step))
        assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


def test_a_resized_schedule_is_the_one_planned_that_long_and_its_plan_is_not_state() -> None:
    """``resize`` re-plans from the schedule's start, the current step's rate at once; the
    state dict carries the step, not the plan, so that loading it keeps the loader's plan (a
    state dict that still holds a plan, as older checkpoints do, is read the same way)."""
    opt, sched, _ = _make_sched()  # 20 steps, 4 of warmup, 0.4 -> 0.004
    for _ in range(7):
        opt.step()
        sched.step()
    sched.resize(40, 8)
    assert opt.param_groups[0]["lr"] == pytest.approx(warmup_cosine(7, 40, 8, 0.4, 0.004, 0.04))
    assert sched.get_last_lr()[0] == opt.param_groups[0]["lr"]
    state = sched.state_dict()
    assert "total_steps" not in state and "warmup_steps" not in state
    opt2, sched2, _ = _make_sched()
    sched2.load_state_dict({**state, "total_steps": 999, "warmup_steps": 99})
    assert (sched2.last_epoch, sched2.total_steps, sched2.warmup_steps) == (7, 20, 4)
    with pytest.raises(ValueError, match="^warmup_steps: must be in"):
        sched.resize(10, 11)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"total_steps": 0}, "total_steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"total_steps": 5, "warmup_steps": 6}, "warmup_steps"),
        ({"final_lr": -0.1}, "final_lr"),
        ({"start_lr": -1.0}, "start_lr"),
    ],
)
def test_build_scheduler_validation(kwargs: dict[str, Any], field: str) -> None:
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    args: dict[str, Any] = {"total_steps": 10, "warmup_steps": 2}
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"^{field}: "):
        build_scheduler(opt, **args)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"lr": 0.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"trust_coefficient": 0.0}, "trust_coefficient"),
        ({"eps": -1.0}, "eps"),
    ],
)
def test_lars_validation(kwargs: dict[str, Any], field: str) -> None:
    args: dict[str, Any] = {"lr": 0.1}
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"^{field}: "):
        LARS(torch.nn.Linear(2, 2).parameters(), **args)
