"""Counterfactual explanations of SwAV cluster assignments.

"How should this image change to be assigned to another cluster (prototype)?"  The assignment
probabilities are ``p = softmax(prototype_scores(model, x, head) / temperature)`` (cosines of the
embedding to the unit-norm prototypes); :func:`explain` searches, by gradient descent on the
pixels only, an image ``x_cf`` near ``x`` (kept in the valid ``[0, 1]`` pixel range) that is
assigned to a target prototype ``t``.

Two methods:

* ``"ce"`` (the product's method): normalised gradient steps with momentum on
  ``w * CE(scores / ce_temperature, t) + lam_l2 * ||x_cf - x||^2 / D + lam_tv * TV(x_cf)``
  (steepest descent in L2, the norm of the change); each image stops as soon as ``t`` leads
  the runner-up by a log-odds margin (comparable across K, unlike a margin on probabilities),
  the cross-entropy weight grows while it falls short (Wachter et al., 2017), and each edit is
  then shrunk to its smallest multiple that still reaches ``t`` (see :class:`CEOptions`).
* ``"logit"`` (a tutorial's recipe, kept for comparison): Adam on ``-score_t + MSE(x_cf, x)
  + lam_tv * TV(x_cf) + lam_norm * mean(x_cf^2)`` for a fixed number of steps, no early stop.

The model runs in eval mode (every image is optimised independently of the batch) with frozen
parameters; its training mode and ``requires_grad`` flags are restored afterwards.  How the
methods compare is measured in BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from swav.model import SwAVModel

__all__ = [
    "CEOptions",
    "CounterfactualResult",
    "LogitOptions",
    "METHODS",
    "TARGET_MODES",
    "assignment_probs",
    "explain",
    "nearest_other_prototype",
    "other_label_candidates",
    "populated_prototypes",
    "prototype_scores",
    "success",
    "total_variation",
]

METHODS = ("ce", "logit")
# What explain's target may be chosen by, besides a prototype index (nearest of another label / any).
TARGET_MODES = ("other_label", "nearest")


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class CEOptions:
    """Settings of ``method="ce"`` (pass them as keyword arguments of :func:`explain`).

    ``lr``: the size of a step, as the root-mean-square change of the normalised pixels (a step
    moves an image by ``lr * sqrt(D)`` in L2 along its normalised gradient with ``momentum``:
    steepest descent in the norm the change is measured in); ``max_steps``: the most steps per
    image;
    ``margin``: the stop (and validity) condition ``log p_t - max_{k != t} log p_k >= margin`` on
    the assignment probabilities (0.1: the target at least 1.1 times as likely as the runner-up);
    ``ce_temperature``: the temperature of the cross-entropy that is minimised; ``lam_l2``,
    ``lam_tv``: weights of the per-pixel squared change and of the image's total variation.

    Why a separate, sharp ``ce_temperature``: scores are cosines and a trained model's nearest
    prototypes are close, so at the assignment temperature the softmax spreads over many
    prototypes and the cross-entropy rarely opens the gap to the runner-up; a sharper one (but not
    so sharp that it becomes a hinge on the single runner-up) does.  The margin has a geometric
    ceiling: a unit embedding leads the runner-up ``r`` by a score gap of at most
    ``||w_t - w_r||``, i.e. a log-odds margin of ``||w_t - w_r|| / temperature``.
    ``TV(x_cf)`` penalises the edges of the image itself, not of the change: a large ``lam_tv``
    smooths the original strokes and increases the change.

    ``patience``: the cross-entropy weight of an image doubles every ``patience`` steps it stays
    short of the margin (Wachter et al., 2017, grow the prediction term until the counterfactual
    is valid), so the regularisers shape the easy images and cannot hold a hard one at an
    equilibrium in front of its target.  ``max_steps`` is generous because images stop at the
    margin: the budget costs only the hard ones (e.g. ``other_label`` targets).  The defaults and
    their alternatives are measured in BENCHMARKS.md.
    """

    lr: float = 0.005
    momentum: float = 0.9
    max_steps: int = 600
    margin: float = 0.1
    ce_temperature: float = 0.02
    lam_l2: float = 20.0
    lam_tv: float = 1.0
    patience: int = 50

    def __post_init__(self) -> None:
        _check_positive("lr", self.lr)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum: must be in [0, 1), got {self.momentum}")
        _check_steps("max_steps", self.max_steps)
        if not self.margin >= 0.0:
            raise ValueError(f"margin: must be >= 0, got {self.margin}")
        _check_positive("ce_temperature", self.ce_temperature)
        _check_steps("patience", self.patience)
        _check_non_negative("lam_l2", self.lam_l2)
        _check_non_negative("lam_tv", self.lam_tv)


@dataclass(frozen=True)
class LogitOptions:
    """Settings of ``method="logit"``: the tutorial's fixed-step recipe.

    ``steps`` Adam steps of size ``lr``; ``lam_norm`` = 0.01 is the tutorial's weight of the
    ``mean(x_cf^2)`` term, the MSE term has weight 1; ``lam_tv`` (0.1) is ours.
    """

    lr: float = 0.01
    steps: int = 100
    lam_tv: float = 0.1
    lam_norm: float = 0.01

    def __post_init__(self) -> None:
        _check_positive("lr", self.lr)
        _check_steps("steps", self.steps)
        _check_non_negative("lam_tv", self.lam_tv)
        _check_non_negative("lam_norm", self.lam_norm)


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name}: must be > 0, got {value}")


def _check_non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name}: must be >= 0, got {value}")


def _check_steps(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be an int >= 1, got {value!r}")


def _options(method: str, kwargs: dict) -> CEOptions | LogitOptions:
    if method not in METHODS:
        raise ValueError(f"method: unknown method {method!r}, expected one of {METHODS}")
    cls = {"ce": CEOptions, "logit": LogitOptions}[method]
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"method_kwargs: unknown option(s) {unknown} for method {method!r}, "
                         f"expected some of {sorted(allowed)}")
    return cls(**kwargs)


# --------------------------------------------------------------------------- result


@dataclass
class CounterfactualResult:
    """Counterfactuals of a batch and their figures (tensors on the model's device).

    Attributes:
        original: the input images ``x`` ``[N, C, H, W]`` (normalised).
        counterfactual: ``x_cf`` (normalised, detached), within the valid pixel range.
        source: cluster assigned to ``x`` ``[N]``; target: the requested prototype ``[N]``;
        assigned: cluster assigned to ``x_cf`` ``[N]``.
        prob_source_before: ``p_source(x)``; prob_target_after: ``p_target(x_cf)``;
            prob_runner_up_after: the highest ``p_k(x_cf)`` with ``k != target`` ``[N]``.
        steps: optimisation steps applied to every image ``[N]`` (``ce``: fewer than
            ``max_steps`` when it stopped early; ``logit``: always ``steps``).
        valid: :func:`success` of ``x_cf`` at the method's ``margin`` ``[N]``.
        margin: the method's log-odds margin (``ce``: ``CEOptions.margin``; ``logit``: 0, i.e.
            the target is the most likely cluster).
        l1: mean absolute change per pixel and channel in pixel space ``[0, 1]``
            (de-normalised: ``mean |(x_cf - x) * std|`` over ``C, H, W``) ``[N]``.
        l2: Euclidean norm of the whole change in pixel space
            (``sqrt(sum ((x_cf - x) * std)^2)`` over ``C, H, W``) ``[N]``.
    """

    original: torch.Tensor
    counterfactual: torch.Tensor
    source: torch.Tensor
    target: torch.Tensor
    assigned: torch.Tensor
    prob_source_before: torch.Tensor
    prob_target_after: torch.Tensor
    prob_runner_up_after: torch.Tensor
    steps: torch.Tensor
    valid: torch.Tensor
    l1: torch.Tensor
    l2: torch.Tensor
    margin: float = 0.0

    def summary(self) -> dict[str, float]:
        """Means over the images: ``validity`` (the share of valid images), ``l1``, ``l2`` and
        ``steps``."""
        return {
            "validity": float(self.valid.float().mean()),
            "l1": float(self.l1.mean()),
            "l2": float(self.l2.mean()),
            "steps": float(self.steps.float().mean()),
        }


# --------------------------------------------------------------------------- scores


def prototype_scores(model: SwAVModel, x: torch.Tensor, head: int = 0) -> torch.Tensor:
    """Scores ``[N, K]`` of ``x`` against the prototypes of ``head`` (no mode change: call it on a
    model in eval mode for per-image results)."""
    z = model.projection_head(model.backbone(x))
    return model.prototypes.heads[head](z)


def assignment_probs(scores: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Assignment probabilities ``softmax(scores / temperature)`` over prototypes."""
    return torch.softmax(scores / temperature, dim=1)


def nearest_other_prototype(model: SwAVModel, assigned: torch.Tensor, head: int = 0,
                            candidates: torch.Tensor | None = None) -> torch.Tensor:
    """For every cluster in ``assigned`` the most cosine-similar *other* prototype of ``head``.

    ``candidates``: an optional bool mask of the prototypes that may be chosen, ``[K]`` for all
    images (e.g. the populated ones, :func:`populated_prototypes`) or ``[N, K]`` per image (e.g.
    :func:`other_label_candidates`).  With a large K many prototypes hold no image, and the
    nearest prototype is then usually an empty one that no real image is assigned to.
    """
    weight = F.normalize(model.prototypes.heads[head].weight.detach(), dim=1)
    k = weight.shape[0]
    if k < 2:
        raise ValueError("target: no other prototype to aim at with K=1")
    sims = weight[assigned] @ weight.T  # [N, K]
    if candidates is not None:
        mask = torch.as_tensor(candidates, device=sims.device)
        if mask.dtype != torch.bool or mask.shape not in ((k,), (len(assigned), k)):
            raise ValueError(f"candidates: expected a bool mask of shape ({k},) or "
                             f"({len(assigned)}, {k}), got {mask.dtype} {tuple(mask.shape)}")
        sims = sims.masked_fill(~mask.expand_as(sims), float("-inf"))
    rows = torch.arange(len(assigned), device=sims.device)
    sims[rows, assigned] = float("-inf")
    best = sims.max(dim=1)
    if not bool(torch.isfinite(best.values).all()):
        lonely = int(assigned[~torch.isfinite(best.values)][0])
        raise ValueError(f"candidates: no candidate prototype other than {lonely} to aim at")
    return best.indices


def populated_prototypes(assignments: torch.Tensor, n_prototypes: int) -> torch.Tensor:
    """Bool mask ``[n_prototypes]`` of the prototypes that hold at least one of ``assignments``."""
    return torch.bincount(assignments.flatten().long().cpu(), minlength=n_prototypes) > 0


def other_label_candidates(source: torch.Tensor, majority: torch.Tensor,
                           populated: torch.Tensor) -> torch.Tensor:
    """Per image ``[N, K]``: the populated prototypes whose majority label differs from that of
    the image's own cluster ``source`` ("what turns this 3 into an 8?").  ``majority`` ``[K]``:
    each prototype's majority label, -1 where it holds no labelled image
    (:func:`swav.evaluation.majority_labels`)."""
    majority = majority.to(source.device)
    own = majority[source]
    return populated.to(source.device)[None, :] & (majority[None, :] >= 0) & (
        majority[None, :] != own[:, None])


def success(probs: torch.Tensor, target: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Whether each counterfactual reached its target ``[N]`` bool: the target is the most
    likely cluster and leads the runner-up by a log-odds ``log p_t - max_{k != t} log p_k >=
    margin`` (0: only "the most likely").  The one definition the results, the metrics, the
    console and the panels share."""
    return (probs.argmax(dim=1) == target) & (_margin(probs, target) >= margin)


def _margin(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Log-odds of the target against the runner-up, ``log p_t - max_{k != t} log p_k``, per row."""
    log_p = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
    p_t = log_p.gather(1, target[:, None]).squeeze(1)
    others = log_p.scatter(1, target[:, None], float("-inf"))
    return p_t - others.max(dim=1).values


# --------------------------------------------------------------------------- regularisers


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation per image ``[N]``: the mean absolute difference over all pairs
    of vertically or horizontally neighbouring pixels (and channels)."""
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().flatten(1)
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().flatten(1)
    return torch.cat([dh, dw], dim=1).mean(dim=1)


def _sq_change(x_cf: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``||x_cf - x||^2 / D`` per image (the per-image MSE)."""
    return (x_cf - x).pow(2).flatten(1).mean(dim=1)


# --------------------------------------------------------------------------- validation


def _first_conv(model: nn.Module) -> nn.Conv2d | None:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def _check_images(model: SwAVModel, images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a 4-D [N, C, H, W] tensor, got {shape}")
    if images.shape[0] == 0:
        raise ValueError("images: empty batch")
    if not images.is_floating_point():
        raise ValueError(f"images: expected normalised float images, got {images.dtype}")
    conv = _first_conv(model.backbone)
    if conv is not None and images.shape[1] != conv.in_channels:
        raise ValueError(
            f"images: {images.shape[1]} channels, the model expects {conv.in_channels}")


def _bounds(mean: Sequence[float], std: Sequence[float], like: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lo, hi, std)`` as ``[1, C, 1, 1]`` tensors for the valid pixel range ``[0, 1]``."""
    channels = like.shape[1]
    as_t = {n: torch.as_tensor(v, dtype=like.dtype, device=like.device).flatten()
            for n, v in (("mean", mean), ("std", std))}
    for name, t in as_t.items():
        if t.numel() != channels:
            raise ValueError(f"{name}: {t.numel()} values for {channels} channels")
    if not bool((as_t["std"] > 0).all()):
        raise ValueError(f"std: must be > 0, got {as_t['std'].tolist()}")
    m, s = (t.view(1, channels, 1, 1) for t in as_t.values())
    return (0 - m) / s, (1 - m) / s, s


def _resolve_targets(target: int | Sequence[int] | torch.Tensor | None, source: torch.Tensor,
                     model: SwAVModel, head: int, candidates: torch.Tensor | None
                     ) -> torch.Tensor:
    """Per-image targets ``[N]``: the nearest other (candidate) prototype, one int for all, or
    one per image."""
    k = model.prototypes.heads[head].out_features
    if target is None:
        return nearest_other_prototype(model, source, head, candidates)
    if isinstance(target, bool):
        raise ValueError(f"target: expected an int or a LongTensor, got {target!r}")
    t = torch.as_tensor(target, device=source.device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"target: expected integer prototype indices, got {t.dtype}")
    t = t.long()
    if t.dim() == 0:
        t = t.expand(len(source))
    elif t.shape != source.shape:
        raise ValueError(f"target: expected one int or {len(source)} targets, got shape "
                         f"{tuple(t.shape)}")
    bad = t[(t < 0) | (t >= k)]
    if bad.numel():
        raise ValueError(f"target: prototype {int(bad[0])} out of range for K={k}")
    return t.clone()


def _check_head(model: SwAVModel, head: int) -> None:
    n = len(model.prototypes.heads)
    if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < n:
        raise ValueError(f"head: {head!r} out of range for {n} prototype head(s)")


# --------------------------------------------------------------------------- model state


@contextlib.contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode and no ``requires_grad`` on the parameters; both restored on exit."""
    modes = {m: m.training for m in model.modules()}
    flags = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    for p in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training
        for p, flag in flags.items():
            p.requires_grad_(flag)


# --------------------------------------------------------------------------- optimisation


class _Problem:
    """What both methods share: the batch, its bounds, targets and the model call.

    The search optimises a variable ``v`` that :meth:`image` maps to normalised images: the
    images themselves, or (``gray``) one plane of gray pixel values ``[N, 1, H, W]`` in [0, 1]
    that every channel shows, so the counterfactual of a grayscale image stays grayscale (its
    gradient is the sum over the channels: no colour edit is made and then averaged away)."""

    def __init__(self, model: SwAVModel, x: torch.Tensor, target: torch.Tensor,
                 lo: torch.Tensor, hi: torch.Tensor, head: int, temperature: float,
                 gray: bool = False) -> None:
        self.model, self.x, self.target = model, x, target
        self.lo, self.hi, self.head, self.temperature = lo, hi, head, temperature
        self.gray = gray
        self._start: torch.Tensor | None = None

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return prototype_scores(self.model, x, self.head)

    def start(self) -> torch.Tensor:
        """The variable at the original images."""
        if not self.gray:
            return self.x.clone()
        # lo = -mean/std, hi = (1 - mean)/std: pixel = (x - lo) / (hi - lo).
        return ((self.x - self.lo) / (self.hi - self.lo)).mean(dim=1, keepdim=True)

    def image(self, v: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised images of the variable (of the images ``rows``, when it is a subset): the
        originals plus the change, so an unchanged variable gives the originals exactly."""
        if not self.gray:
            return v
        x = self.x if rows is None else self.x[rows]
        return x + (v - self._v0(rows)) * (self.hi - self.lo)

    def _v0(self, rows: torch.Tensor | None) -> torch.Tensor:
        if self._start is None:
            self._start = self.start()
        return self._start if rows is None else self._start[rows]

    def lr(self, lr: float) -> float:
        """The step size for the variable: ``lr`` is a step on normalised pixels; a gray pixel
        moves each channel by its ``1 / std`` times the step."""
        return lr if not self.gray else lr / float((self.hi - self.lo).mean())

    def clamp_(self, v: torch.Tensor) -> None:
        """Project the variable onto the valid pixel range."""
        with torch.no_grad():
            if self.gray:
                v.clamp_(0.0, 1.0)
            else:
                torch.maximum(torch.minimum(v, self.hi), self.lo, out=v)


def _ce_loss(problem: _Problem, opts: CEOptions, xi: torch.Tensor, scores: torch.Tensor,
             idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-image loss ``[len(idx)]`` of the ``ce`` search for the rows ``idx`` (images ``xi``);
    ``weight`` ``[len(idx)]``: each image's cross-entropy weight."""
    ce = F.cross_entropy(scores / opts.ce_temperature, problem.target[idx], reduction="none")
    return (weight * ce
            + opts.lam_l2 * _sq_change(xi, problem.x[idx])
            + opts.lam_tv * total_variation(xi))


def _run_ce(problem: _Problem, opts: CEOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Early-stopped cross-entropy search, then the smallest valid multiple of each edit.
    Returns ``(x_cf, steps)``.

    Every iteration scores the still active images; those that reach the margin are frozen
    (their value is restored after every step, as the momentum would move them on), the others
    take one normalised step on their own loss (summed over images, so each image's gradient and
    step are independent of the rest of the batch).
    """
    n, device = len(problem.x), problem.x.device
    v = problem.start().requires_grad_(True)
    velocity = torch.zeros_like(v)
    step = problem.lr(opts.lr) * v[0].numel() ** 0.5  # an RMS change of lr per variable
    steps = torch.zeros(n, dtype=torch.long, device=device)
    active = torch.ones(n, dtype=torch.bool, device=device)
    for _ in range(opts.max_steps):
        idx = active.nonzero().squeeze(1)
        xi = problem.image(v[idx], idx)
        scores = problem.scores(xi)
        probs = assignment_probs(scores.detach(), problem.temperature)
        reached = success(probs, problem.target[idx], opts.margin)
        active[idx[reached]] = False
        if not bool(active.any()):
            break
        frozen = v.detach()[~active].clone()
        # Wachter et al. (2017): the cross-entropy weight doubles every `patience` steps an image
        # spends short of the margin, so the regularisers cannot hold it in front of its target.
        weight = 2.0 ** torch.div(steps[idx], opts.patience, rounding_mode="floor").float()
        loss = _ce_loss(problem, opts, xi, scores, idx, weight)
        (grad,) = torch.autograd.grad(loss[~reached].sum(), v)
        with torch.no_grad():
            _normalised_momentum_step_(v, grad, velocity, step, opts.momentum)
            v[~active] = frozen
        problem.clamp_(v)
        steps[active] += 1
    return _smallest_valid_edit(problem, v.detach(), opts), steps


def _normalised_momentum_step_(v: torch.Tensor, grad: torch.Tensor, velocity: torch.Tensor,
                               step: float, momentum: float) -> None:
    """``v -= step * m / ||m||`` per image, ``m = momentum * m + g / ||g||`` (in place).

    Steepest descent in the L2 norm, which is the norm the change is measured in: a step moves an
    image by ``step`` along its gradient, so the pixels that matter most move most.  (Adam moves
    every pixel by about its step size whatever its gradient, steepest descent in the max norm, and
    needs more L2 change for the same targets.)  The momentum
    averages the directions, so a search between two close runners-up does not zig-zag.
    """
    def unit(t: torch.Tensor) -> torch.Tensor:
        norm = t.flatten(1).norm(dim=1).clamp_min(1e-12)
        return t / norm.view(-1, *[1] * (t.dim() - 1))

    velocity.mul_(momentum).add_(unit(grad))
    v.sub_(step * unit(velocity))


def _smallest_valid_edit(problem: _Problem, v: torch.Tensor, opts: CEOptions,
                         iterations: int = 10) -> torch.Tensor:
    """Each counterfactual pulled back to ``x + a * (x_cf - x)`` with the smallest ``a`` in
    ``(0, 1]`` (bisection to ``2^-iterations``) that still reaches the target by the margin.

    The search stops at the first step past the margin and carries the regularisers' and the
    momentum's detours; scaling the edit down keeps its pattern, stays in the pixel range (a
    mix of two valid images) and, for gray edits, gray, with a smaller L2 change.  Images that did not reach the target keep their edit."""
    x = problem.x
    delta = problem.image(v) - x
    shape = (-1,) + (1,) * (x.dim() - 1)
    ok_hi = torch.ones(len(x), dtype=x.dtype, device=x.device)
    lo = torch.zeros_like(ok_hi)
    with torch.no_grad():
        valid = success(assignment_probs(problem.scores(x + delta), problem.temperature),
                        problem.target, opts.margin)
        for _ in range(iterations):
            mid = (lo + ok_hi) / 2
            probs = assignment_probs(problem.scores(x + mid.view(shape) * delta),
                                     problem.temperature)
            ok = success(probs, problem.target, opts.margin)
            ok_hi = torch.where(ok, mid, ok_hi)
            lo = torch.where(ok, lo, mid)
    scale = torch.where(valid, ok_hi, torch.ones_like(ok_hi))
    return x + scale.view(shape) * delta


def _run_logit(problem: _Problem, opts: LogitOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """The tutorial's recipe: maximise the raw target score for a fixed number of steps."""
    x, target = problem.x, problem.target
    v = problem.start().requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=problem.lr(opts.lr))
    for _ in range(opts.steps):
        x_cf = problem.image(v)
        score_t = problem.scores(x_cf).gather(1, target[:, None]).squeeze(1)
        loss = (-score_t + _sq_change(x_cf, x) + opts.lam_tv * total_variation(x_cf)
                + opts.lam_norm * x_cf.pow(2).flatten(1).mean(dim=1))
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward(inputs=[v])
        optimizer.step()
        problem.clamp_(v)
    return problem.image(v.detach()), torch.full((len(x),), opts.steps, dtype=torch.long, device=x.device)


# --------------------------------------------------------------------------- entry point


def explain(
    model: SwAVModel,
    images: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    method: str = "ce",
    *,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    head: int = 0,
    temperature: float = 0.1,
    candidates: torch.Tensor | None = None,
    grayscale: bool | None = None,
    **method_kwargs: float | int,
) -> CounterfactualResult:
    """Counterfactuals of ``images`` towards target prototypes.

    Args:
        model: a trained :class:`SwAVModel` (left unchanged; its training mode is restored).
        images: normalised images ``[N, C, H, W]`` (as fed to the model).
        target: ``None`` for the prototype nearest (cosine) to each image's assigned one, an int
            for all images, or one index per image (``LongTensor [N]`` or a sequence).
        method: ``"ce"`` (early-stopped cross-entropy, default) or ``"logit"`` (fixed steps).
        mean, std: the per-channel normalisation of ``images``; they set the valid pixel range
            and the pixel-space distances.
        head: which prototype head to explain.
        temperature: of the assignment softmax (SwAV's 0.1).
        candidates: with ``target=None``, a bool mask ``[K]`` or ``[N, K]`` of the prototypes
            the nearest one is chosen from (e.g. :func:`populated_prototypes` of a held-out set,
            or :func:`other_label_candidates`); ``None``: all.
        grayscale: edit luminance only, so that a grayscale image (three equal channels)
            stays grayscale; ``None``: when every image of the batch is grayscale.
        method_kwargs: :class:`CEOptions` (``lr, momentum, max_steps, margin, ce_temperature,
            lam_l2, lam_tv, patience``) or
            :class:`LogitOptions` (``lr, steps, lam_tv, lam_norm``) fields.

    Raises:
        ValueError: bad ``method``/options, ``images``, ``mean``/``std``, ``head`` or ``target``.
    """
    opts = _options(method, method_kwargs)
    _check_images(model, images)
    _check_head(model, head)
    _check_positive("temperature", temperature)
    param = next(model.parameters())
    x = images.detach().to(param.device, param.dtype)
    lo, hi, std_t = _bounds(mean, std, x)
    gray = _is_gray(x, lo, hi) if grayscale is None else bool(grayscale)
    with _frozen_eval(model), torch.enable_grad():
        probs_before = _probs_or_reject(model, x, head, temperature)
        source = probs_before.argmax(dim=1)
        tgt = _resolve_targets(target, source, model, head, candidates)
        problem = _Problem(model, x, tgt, lo, hi, head, temperature, gray)
        run = _run_logit if method == "logit" else _run_ce
        x_cf, steps = run(problem, opts)
        with torch.no_grad():
            probs_after = assignment_probs(prototype_scores(model, x_cf, head), temperature)
    margin = opts.margin if isinstance(opts, CEOptions) else 0.0
    return _result(x, x_cf, source, tgt, probs_before, probs_after, steps, std_t, margin=margin)


def _is_gray(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> bool:
    """Three channels equal in pixel space, in every image (to 1e-4 of the pixel range)."""
    if x.shape[1] != 3:
        return False
    pixel = (x - lo) / (hi - lo)
    return bool((pixel - pixel.mean(dim=1, keepdim=True)).abs().max() <= 1e-4)


def _probs_or_reject(model: SwAVModel, x: torch.Tensor, head: int, temperature: float
                     ) -> torch.Tensor:
    """Assignment probabilities of ``x``; a forward error becomes ``ValueError("images: ...")``."""
    try:
        with torch.no_grad():
            return assignment_probs(prototype_scores(model, x, head), temperature)
    except RuntimeError as err:
        raise ValueError(f"images: the model rejects a batch of shape {tuple(x.shape)}: {err}"
                         ) from err


def _result(x: torch.Tensor, x_cf: torch.Tensor, source: torch.Tensor, target: torch.Tensor,
            probs_before: torch.Tensor, probs_after: torch.Tensor, steps: torch.Tensor,
            std: torch.Tensor, margin: float) -> CounterfactualResult:
    assigned = probs_after.argmax(dim=1)
    others = probs_after.scatter(1, target[:, None], float("-inf"))
    change = ((x_cf - x) * std).flatten(1)
    return CounterfactualResult(
        original=x,
        counterfactual=x_cf,
        source=source,
        target=target,
        assigned=assigned,
        prob_source_before=probs_before.gather(1, source[:, None]).squeeze(1),
        prob_target_after=probs_after.gather(1, target[:, None]).squeeze(1),
        prob_runner_up_after=others.max(dim=1).values,
        steps=steps,
        valid=success(probs_after, target, margin),
        l1=change.abs().mean(dim=1),
        l2=change.pow(2).sum(dim=1).sqrt(),
        margin=margin,
    )
