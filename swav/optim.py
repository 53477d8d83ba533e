"""Optimizers and learning-rate schedules for SwAV training.

Pure PyTorch (no ray / mlflow).

Sources
-------
* LARS: Y. You, I. Gitman, B. Ginsburg, "Large Batch Training of Convolutional
  Networks", arXiv:1708.03888, 2017.  Layer-wise Adaptive Rate Scaling scales
  each layer's update by a local learning rate
  ``trust_coefficient * ||w|| / (||grad|| + weight_decay * ||w||)``.
* SwAV: M. Caron et al., "Unsupervised Learning of Visual Features by
  Contrasting Cluster Assignments", NeurIPS 2020.  The reference
  implementation (facebookresearch/swav, ``main_swav.py``) wraps SGD in
  apex's ``LARC`` with ``trust_coefficient=0.001`` and ``clip=False`` and uses a
  per-iteration schedule: linear warmup from ``start_warmup`` to ``base_lr``
  followed by a cosine decay to ``final_lr``.

The :class:`LARS` implemented here follows the LARC (no clipping) update rule,
and additionally supports per-group exclusion (``lars_exclude``) of biases and
normalisation parameters, which then receive plain SGD-momentum without weight
decay (a common practice, e.g. in BYOL/SimCLR LARS setups; the original SwAV
code applies LARC to all parameters).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = [
    "LARS",
    "param_groups",
    "build_optimizer",
    "warmup_cosine",
    "WarmupCosine",
    "build_scheduler",
    "OPTIMIZER_NAMES",
]

#: Optimizer names accepted by :func:`build_optimizer` (lower-case).
OPTIMIZER_NAMES: tuple[str, ...] = ("sgd", "lars", "adamw")

ParamsT = Union[Iterable[torch.Tensor], Iterable[dict[str, Any]]]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and Layer-wise Adaptive Rate Scaling (You et al. 2017).

    For every parameter ``w`` with a gradient in a group that is not
    ``lars_exclude``::

        g        = grad + weight_decay * w
        local_lr = trust_coefficient * ||w|| / (||grad|| + weight_decay * ||w|| + eps)
                   (if ||w|| > 0 and ||grad|| > 0, else 1)
        buf      = momentum * buf + local_lr * g
        w        = w - lr * buf

    This equals apex ``LARC(SGD, trust_coefficient=0.001, clip=False)`` as used
    by SwAV (facebookresearch/swav ``main_swav.py``).

    For groups with ``lars_exclude=True`` (biases, norm layers) the update is
    plain SGD with momentum, **without** weight decay and without trust ratio::

        buf = momentum * buf + grad
        w   = w - lr * buf

    Parameters whose ``.grad`` is ``None`` are skipped entirely: their weights
    and optimizer state are left untouched (SwAV freezes the prototypes during
    the first iterations by setting their gradient to ``None``).

    Args:
        params: iterable of parameters or of parameter-group dicts.  Groups may
            set ``lr``, ``momentum``, ``weight_decay``, ``trust_coefficient``,
            ``eps`` and ``lars_exclude``.
        lr: learning rate.
        momentum: momentum factor in ``[0, 1)``.
        weight_decay: L2 penalty coefficient (ignored for excluded groups).
        trust_coefficient: LARS trust coefficient ``eta`` (SwAV: 0.001).
        eps: added to the denominator of the local learning rate.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
    ) -> None:
        if not lr > 0.0:
            raise ValueError(f"lr: must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum: must be in [0, 1), got {momentum}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay: must be >= 0, got {weight_decay}")
        if not trust_coefficient > 0.0:
            raise ValueError(
                f"trust_coefficient: must be > 0, got {trust_coefficient}"
            )
        if not eps >= 0.0:
            raise ValueError(f"eps: must be >= 0, got {eps}")
        defaults: dict[str, Any] = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            lars_exclude=False,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Optional[Callable[[], Any]] = None
    ) -> Any:
        """Perform a single optimisation step.

        Args:
            closure: optional callable that re-evaluates the model and returns
                the loss; it is run with gradients enabled.

        Returns:
            The loss returned by ``closure``, or ``None``.
        """
        loss: Any = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if any(g.is_sparse for g in grads):
                raise RuntimeError("LARS does not support sparse gradients")
            updates = grads if group.get("lars_exclude", False) else self._trust_scaled(
                params, grads, group)
            self._momentum_step(params, updates, group["momentum"], group["lr"])
        return loss


    @staticmethod
    def _trust_scaled(params: list[torch.Tensor], grads: list[torch.Tensor],
                      group: dict[str, Any]) -> list[torch.Tensor]:
        """``(grad + wd * w) * local_lr`` for every parameter, with one batched kernel per
        operation (``torch._foreach_*``) instead of a handful per parameter."""
        wd, eta, eps = group["weight_decay"], group["trust_coefficient"], group["eps"]
        w_norm = torch.stack(torch._foreach_norm(params))
        g_norm = torch.stack(torch._foreach_norm(grads))
        local_lr = torch.where((w_norm > 0) & (g_norm > 0),
                               eta * w_norm / (g_norm + wd * w_norm + eps),
                               torch.ones_like(w_norm))
        updates = torch._foreach_add(grads, params, alpha=wd)
        torch._foreach_mul_(updates, list(local_lr.unbind()))
        return updates

    def _momentum_step(self, params: list[torch.Tensor], updates: list[torch.Tensor],
                       momentum: float, lr: float) -> None:
        """``buf = momentum * buf + update`` (first step: ``buf = update``); ``w -= lr * buf``."""
        bufs = []
        for p, update in zip(params, updates):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, updates)
        torch._foreach_add_(params, bufs, alpha=-lr)

def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into decay / no-decay groups.

    * parameters with ``ndim >= 2`` (conv / linear weights) get
      ``weight_decay`` and ``lars_exclude=False``;
    * parameters with ``ndim <= 1`` (biases, normalisation scales/shifts)
      get ``weight_decay=0.0`` and ``lars_exclude=True``.

    Parameters with ``requires_grad=False`` are skipped; empty groups are
    dropped.

    Args:
        model: the module whose parameters to group.
        weight_decay: weight decay for the ``ndim >= 2`` group.

    Returns:
        A list of (at most two) parameter-group dicts, decay group first.
    """
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append(
            {"params": decay, "weight_decay": float(weight_decay), "lars_exclude": False}
        )
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_exclude": True})
    return groups


def build_optimizer(
    model: torch.nn.Module,
    name: str,
    lr: float,
    weight_decay: float = 1e-6,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """Build an optimizer over :func:`param_groups` of ``model``.

    Args:
        model: the module to optimise.
        name: one of ``"sgd"``, ``"lars"``, ``"adamw"`` (case-insensitive).
        lr: base learning rate (> 0).
        weight_decay: weight decay (>= 0) for ``ndim >= 2`` parameters.
        momentum: momentum in ``[0, 1)`` for SGD and LARS (ignored by AdamW,
            which uses its default betas).

    Returns:
        ``torch.optim.SGD`` (with momentum), :class:`LARS` or
        ``torch.optim.AdamW``.

    Raises:
        ValueError: with a message starting with the offending field name.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in OPTIMIZER_NAMES:
        raise ValueError(
            f"name: unknown optimizer {name!r}, expected one of "
            f"{', '.join(OPTIMIZER_NAMES)}"
        )
    if not lr > 0:
        raise ValueError(f"lr: must be > 0, got {lr}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay: must be >= 0, got {weight_decay}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum: must be in [0, 1), got {momentum}")

    groups = param_groups(model, weight_decay)
    if key == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if key == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=momentum, weight_decay=weight_decay
        )
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def warmup_cosine(
    step: int,
    total_steps: int,
    warmup_steps: int,
    base_lr: float,
    final_lr: float = 0.0,
    start_lr: float = 0.0,
) -> float:
    """Learning rate at ``step`` of a linear-warmup + cosine-decay schedule.

    As in facebookresearch/swav ``main_swav.py`` (per-iteration schedule):

    * ``step < warmup_steps``: linear from ``start_lr`` (step 0) towards
      ``base_lr`` (reached at ``step == warmup_steps``);
    * ``warmup_steps <= step < total_steps``:
      ``final_lr + 0.5 * (base_lr - final_lr) * (1 + cos(pi * (step - warmup_steps)
      / (total_steps - warmup_steps)))``;
    * ``step >= total_steps``: ``final_lr``.

    Args:
        step: current (0-based) iteration.
        total_steps: total number of iterations.
        warmup_steps: number of warmup iterations.
        base_lr: peak learning rate.
        final_lr: learning rate at and after ``total_steps``.
        start_lr: learning rate at step 0 of the warmup.

    Returns:
        The learning rate as a float.
    """
    if step >= total_steps:
        return float(final_lr)
    if step < warmup_steps:
        return float(start_lr + (base_lr - start_lr) * step / warmup_steps)
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return float(final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * progress)))


class WarmupCosine(LRScheduler):
    """Per-iteration :func:`warmup_cosine` schedule with absolute rates: each group goes from
    ``start_lr`` to its own initial lr (the peak) and decays to ``final_lr``.

    The schedule's length (``total_steps``, ``warmup_steps``) is its plan, set at construction
    and by :meth:`resize`; the state dict holds where the schedule is (the step), not the plan,
    so that a resumed run keeps the plan it was built with."""

    PLAN = ("total_steps", "warmup_steps")

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                 final_lr: float, start_lr: float) -> None:
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.final_lr, self.start_lr = final_lr, start_lr
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [warmup_cosine(self.last_epoch, self.total_steps, self.warmup_steps, base,
                              self.final_lr, self.start_lr) for base in self.base_lrs]

    def resize(self, total_steps: int, warmup_steps: int) -> None:
        """Plan the schedule over ``total_steps`` from its start, ``warmup_steps`` of warmup
        (e.g. a run fitted to a time budget); the current step's rate follows at once."""
        _check_plan(total_steps, warmup_steps)
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        rates = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, rates):
            group["lr"] = lr
        self._last_lr = rates

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if k not in self.PLAN}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # (checkpoints written before the plan left the state dict still hold it: ignored)
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in self.PLAN})


def _check_plan(total_steps: int, warmup_steps: int) -> None:
    if not total_steps >= 1:
        raise ValueError(f"total_steps: must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps: must be in [0, total_steps={total_steps}], got {warmup_steps}"
        )


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    final_lr: float = 0.0,
    start_lr: float = 0.0,
) -> WarmupCosine:
    """Per-iteration warmup + cosine scheduler (call ``.step()`` every batch).

    Each group's learning rate follows ``warmup_cosine(step, total_steps, warmup_steps,
    base_lr=<the group's initial lr>, final_lr, start_lr)``, as in ``main_swav.py``.

    Args:
        optimizer: the optimizer to schedule (its lr is the peak, reached after warmup).
        total_steps: total number of iterations (>= 1).
        warmup_steps: warmup iterations, ``0 <= warmup_steps <= total_steps``.
        final_lr: learning rate at and after ``total_steps``.
        start_lr: learning rate at step 0 of the warmup.

    Raises:
        ValueError: with a message starting with the offending field name.
    """
    _check_plan(total_steps, warmup_steps)
    for name, value in (("final_lr", final_lr), ("start_lr", start_lr)):
        if not value >= 0:
            raise ValueError(f"{name}: must be >= 0, got {value}")
    return WarmupCosine(optimizer, total_steps, warmup_steps, final_lr, start_lr)
