"""Counterfactual explanations of SwAV cluster assignments.

"How should this image change to be assigned to another cluster (prototype)?"  For an image batch
``x`` (normalised ``[N, C, H, W]`` tensors, as fed to the model) the assignment probabilities are

    ``p = softmax(prototype_scores(model, x, head) / temperature)``

with ``prototype_scores = prototypes.heads[head](projection_head(backbone(x)))`` (the cosine
similarities of the L2-normalised embedding to the unit-norm prototypes) and the assigned cluster
is ``argmax p``.  :func:`explain` searches, by gradient descent on the pixels only, an image
``x_cf`` near ``x`` that is assigned to a target prototype ``t``.  Pixels stay in the normalised
image of the valid ``[0, 1]`` range: ``lo_c = -mean_c / std_c``, ``hi_c = (1 - mean_c) / std_c``.

Two methods:

* ``"ce"`` (the product's method): Adam on ``CE(scores / temperature, t)
  + lam_l2 * ||x_cf - x||^2 / D + lam_tv * TV(x_cf)``; every image stops (and is frozen) as soon
  as it is assigned to ``t`` with a margin ``log p_t - max_{k != t} log p_k >= margin`` (a
  log-odds margin: unlike a margin on probabilities it means the same for K = 30 and K = 3000,
  where every probability is small).
* ``"margin"``: the same early-stopped search with a hinge on the raw score gap
  ``s_t - max_{k != t} s_k`` instead of the cross-entropy (see :class:`MarginOptions`): on a
  well-trained model the cross-entropy search stalls, the hinge reaches its targets.
* ``"logit"`` (a tutorial's recipe, kept for comparison): Adam on ``-score_t + MSE(x_cf, x)
  + lam_tv * TV(x_cf) + lam_norm * mean(x_cf^2)`` for a fixed number of steps, no early stop.

The model is put in eval mode (BatchNorm uses its running statistics, so every image is optimised
independently of the rest of the batch) and its parameters neither require nor receive gradients;
its training mode and ``requires_grad`` flags are restored afterwards.
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
    "EarlyStopOptions",
    "LogitOptions",
    "METHODS",
    "MarginOptions",
    "assignment_probs",
    "explain",
    "nearest_other_prototype",
    "prototype_scores",
    "total_variation",
]

METHODS = ("ce", "margin", "logit")


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class EarlyStopOptions:
    """Settings shared by the early-stopped searches (``ce``, ``margin``) and their checks."""

    lr: float = 0.01
    max_steps: int = 300
    margin: float = 0.5
    lam_l2: float = 20.0
    lam_tv: float = 1.0

    def __post_init__(self) -> None:
        _check_positive("lr", self.lr)
        _check_steps("max_steps", self.max_steps)
        if not self.margin >= 0.0:
            raise ValueError(f"margin: must be >= 0, got {self.margin}")
        _check_non_negative("lam_l2", self.lam_l2)
        _check_non_negative("lam_tv", self.lam_tv)


@dataclass(frozen=True)
class CEOptions(EarlyStopOptions):
    """Settings of ``method="ce"`` (pass them as keyword arguments of :func:`explain`).

    ``lr``: Adam's step on the normalised pixels; ``max_steps``: the most steps per image;
    ``margin``: the stop (and validity) condition ``log p_t - max_{k != t} log p_k >= margin``
    (0.5: the target is at least 1.65 times as likely as the runner-up).

    Defaults ``lam_l2 = 20`` and ``lam_tv = 1`` were measured on small digits models (K = 20 and
    30, 64 held-out images, nearest-other-prototype and random targets): validity stays at 100%
    and the steps within 10%, while the mean L2 change is 5-16% below the unregularised
    search.  The early stop sets most of the change (the search ends after 10-30 steps), so the
    regularisers only steer the path: the L2 term, 0 at the start, holds back pixels whose
    cross-entropy gradient is small.  Stronger settings cost validity: ``lam_l2 = 50`` starts
    losing images (98%), ``lam_l2 = 100`` 92-95%, ``lam_l2 = 1000`` 12%.  ``TV(x_cf)`` penalises
    the edges of the image itself, not of the change: beyond ``lam_tv`` of about 10 it smooths
    the original strokes and *increases* the change (``lam_tv = 30``: +12-27% L2; ``lam_tv =
    100``: validity 52%).
    """


@dataclass(frozen=True)
class MarginOptions(EarlyStopOptions):
    """Settings of ``method="margin"``: a hinge on the raw score gap, early-stopped.

    Loss per image: ``relu(margin + 0.01 - (s_t - max_{k != t} s_k)) + lam_l2 * ||x_cf - x||^2 / D
    + lam_tv * TV(x_cf)`` on the cosine scores ``s`` (no softmax), stopped once the gap reaches
    ``margin`` (valid then: ``log p_t - max log p_k = gap / temperature``).  Measured on the
    trained digits default (128 held-out digits, nearest-other targets), where ``ce`` stalls at
    18-28% validity: margin 0.02 gives 97.7% (lam_l2 1) and 99.2% (lam_l2 0.1) with a mean L2
    change of 0.59-0.65, against 1.01 for ``logit``; a larger margin costs validity (0.05: 77%).
    The cross-entropy gradient fades as soon as the target leads, which the hinge does not.
    """

    margin: float = 0.02
    lam_l2: float = 0.1
    lam_tv: float = 0.0


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


def _options(method: str, kwargs: dict) -> EarlyStopOptions | LogitOptions:
    if method not in METHODS:
        raise ValueError(f"method: unknown method {method!r}, expected one of {METHODS}")
    cls = {"ce": CEOptions, "margin": MarginOptions, "logit": LogitOptions}[method]
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
        prob_source_before: ``p_source(x)``; prob_target_after: ``p_target(x_cf)`` ``[N]``.
        steps: optimisation steps applied to every image ``[N]`` (``ce``: fewer than
            ``max_steps`` when it stopped early; ``logit``: always ``steps``).
        valid: ``assigned == target`` (``ce``: and the margin reached) ``[N]``.
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
    steps: torch.Tensor
    valid: torch.Tensor
    l1: torch.Tensor
    l2: torch.Tensor

    def summary(self) -> dict[str, float]:
        """``validity`` (share of valid images), ``l1_mean``, ``l2_mean`` and ``steps_mean``."""
        return {
            "validity": float(self.valid.float().mean()),
            "l1_mean": float(self.l1.mean()),
            "l2_mean": float(self.l2.mean()),
            "steps_mean": float(self.steps.float().mean()),
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


def nearest_other_prototype(model: SwAVModel, assigned: torch.Tensor, head: int = 0
                            ) -> torch.Tensor:
    """For every cluster in ``assigned`` the most cosine-similar *other* prototype of ``head``."""
    weight = F.normalize(model.prototypes.heads[head].weight.detach(), dim=1)
    if weight.shape[0] < 2:
        raise ValueError("target: no other prototype to aim at with K=1")
    sims = weight[assigned] @ weight.T  # [N, K]
    sims[torch.arange(len(assigned), device=sims.device), assigned] = float("-inf")
    return sims.argmax(dim=1)


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
                     model: SwAVModel, head: int) -> torch.Tensor:
    """Per-image targets ``[N]``: the nearest other prototype, one int for all, or one per image."""
    k = model.prototypes.heads[head].out_features
    if target is None:
        return nearest_other_prototype(model, source, head)
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
    """What both methods share: the batch, its bounds, targets and the model call."""

    def __init__(self, model: SwAVModel, x: torch.Tensor, target: torch.Tensor,
                 lo: torch.Tensor, hi: torch.Tensor, head: int, temperature: float) -> None:
        self.model, self.x, self.target = model, x, target
        self.lo, self.hi, self.head, self.temperature = lo, hi, head, temperature

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return prototype_scores(self.model, x, self.head)

    def clamp_(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            torch.maximum(torch.minimum(x, self.hi), self.lo, out=x)


def _ce_loss(problem: _Problem, opts: CEOptions, x_cf: torch.Tensor, logits: torch.Tensor,
             idx: torch.Tensor) -> torch.Tensor:
    """Per-image loss ``[len(idx)]`` of the ``ce`` search for the rows ``idx`` of ``x_cf``."""
    xi = x_cf[idx]
    return (F.cross_entropy(logits, problem.target[idx], reduction="none")
            + opts.lam_l2 * _sq_change(xi, problem.x[idx])
            + opts.lam_tv * total_variation(xi))


def _margin_loss(problem: _Problem, opts: MarginOptions, x_cf: torch.Tensor, logits: torch.Tensor,
                 idx: torch.Tensor) -> torch.Tensor:
    """Per-image loss of the ``margin`` search: hinge on the raw score gap + regularisers."""
    xi, target = x_cf[idx], problem.target[idx]
    scores = logits * problem.temperature
    gap = scores.gather(1, target[:, None]).squeeze(1) - \
        scores.scatter(1, target[:, None], float("-inf")).max(dim=1).values
    return (F.relu(opts.margin + 0.01 - gap)
            + opts.lam_l2 * _sq_change(xi, problem.x[idx])
            + opts.lam_tv * total_variation(xi))


def _log_odds_margin(problem: _Problem, opts: EarlyStopOptions) -> float:
    """The stop/validity margin in log-odds: ``margin`` itself for ``ce``, the score gap over the
    temperature for ``margin``."""
    return opts.margin / problem.temperature if isinstance(opts, MarginOptions) else opts.margin


def _run_early_stopped(problem: _Problem, opts: EarlyStopOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Early-stopped search (``ce`` or ``margin`` loss). Returns ``(x_cf, steps)``.

    Every iteration scores the still active images; those that reach the margin are frozen
    (their value is restored after every optimiser step, as Adam's momentum would move them on),
    the others take one Adam step on their own loss (summed over images, so each image's
    gradient and Adam update is independent of the rest of the batch).
    """
    n, device = len(problem.x), problem.x.device
    x_cf = problem.x.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x_cf], lr=opts.lr)
    steps = torch.zeros(n, dtype=torch.long, device=device)
    active = torch.ones(n, dtype=torch.bool, device=device)
    for _ in range(opts.max_steps):
        idx = active.nonzero().squeeze(1)
        logits = problem.scores(x_cf[idx]) / problem.temperature
        reached = (_margin(logits.detach().softmax(dim=1), problem.target[idx])
                   >= _log_odds_margin(problem, opts))
        active[idx[reached]] = False
        if not bool(active.any()):
            break
        frozen = x_cf.detach()[~active].clone()
        optimizer.zero_grad(set_to_none=True)
        loss = _margin_loss if isinstance(opts, MarginOptions) else _ce_loss
        loss(problem, opts, x_cf, logits, idx)[~reached].sum().backward(inputs=[x_cf])
        optimizer.step()
        with torch.no_grad():
            x_cf[~active] = frozen
        problem.clamp_(x_cf)
        steps[active] += 1
    return x_cf.detach(), steps


def _run_logit(problem: _Problem, opts: LogitOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """The tutorial's recipe: maximise the raw target score for a fixed number of steps."""
    x, target = problem.x, problem.target
    x_cf = x.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x_cf], lr=opts.lr)
    for _ in range(opts.steps):
        score_t = problem.scores(x_cf).gather(1, target[:, None]).squeeze(1)
        loss = (-score_t + _sq_change(x_cf, x) + opts.lam_tv * total_variation(x_cf)
                + opts.lam_norm * x_cf.pow(2).flatten(1).mean(dim=1))
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward(inputs=[x_cf])
        optimizer.step()
        problem.clamp_(x_cf)
    return x_cf.detach(), torch.full((len(x),), opts.steps, dtype=torch.long, device=x.device)


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
    **method_kwargs: float | int,
) -> CounterfactualResult:
    """Counterfactuals of ``images`` towards target prototypes.

    Args:
        model: a trained :class:`SwAVModel` (left unchanged; its training mode is restored).
        images: normalised images ``[N, C, H, W]`` (as fed to the model).
        target: ``None`` for the prototype nearest (cosine) to each image's assigned one, an int
            for all images, or one index per image (``LongTensor [N]`` or a sequence).
        method: ``"ce"`` (early-stopped cross-entropy, default), ``"margin"`` (early-stopped
            score-gap hinge) or ``"logit"`` (fixed steps).
        mean, std: the per-channel normalisation of ``images``; they set the valid pixel range
            and the pixel-space distances.
        head: which prototype head to explain.
        temperature: of the assignment softmax (SwAV's 0.1).
        method_kwargs: :class:`CEOptions` / :class:`MarginOptions` (``lr, max_steps, margin,
            lam_l2, lam_tv``) or
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
    with _frozen_eval(model), torch.enable_grad():
        probs_before = _probs_or_reject(model, x, head, temperature)
        source = probs_before.argmax(dim=1)
        tgt = _resolve_targets(target, source, model, head)
        problem = _Problem(model, x, tgt, lo, hi, head, temperature)
        run = _run_logit if method == "logit" else _run_early_stopped
        x_cf, steps = run(problem, opts)
        with torch.no_grad():
            probs_after = assignment_probs(prototype_scores(model, x_cf, head), temperature)
    margin = None if method == "logit" else _log_odds_margin(problem, opts)  # type: ignore[arg-type]
    return _result(x, x_cf, source, tgt, probs_before, probs_after, steps, std_t, margin=margin)


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
            std: torch.Tensor, margin: float | None) -> CounterfactualResult:
    assigned = probs_after.argmax(dim=1)
    valid = assigned == target
    if margin is not None:
        valid &= _margin(probs_after, target) >= margin
    change = ((x_cf - x) * std).flatten(1)
    return CounterfactualResult(
        original=x,
        counterfactual=x_cf,
        source=source,
        target=target,
        assigned=assigned,
        prob_source_before=probs_before.gather(1, source[:, None]).squeeze(1),
        prob_target_after=probs_after.gather(1, target[:, None]).squeeze(1),
        steps=steps,
        valid=valid,
        l1=change.abs().mean(dim=1),
        l2=change.pow(2).sum(dim=1).sqrt(),
    )
