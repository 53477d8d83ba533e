"""Sinkhorn-Knopp codes for SwAV (Caron et al., 2020, Sec. 3.1 and Appendix A.1).

Given prototype scores ``S`` of ``B`` samples against ``K`` prototypes, SwAV's codes are the
solution of an entropy-regularised transport problem: ``Q = diag(u) exp(S / epsilon) diag(v)``
scaled so that every prototype receives the same share of the batch (``B / K`` samples) and every
sample has a unit of mass.  A few Sinkhorn-Knopp iterations alternate the two normalisations.

This implementation runs the iterations in the log domain.  Multiplying ``exp(S / epsilon)`` by a
constant, a row factor or a column factor is an additive shift of ``S / epsilon``, so the
normalisations become ``logsumexp`` subtractions and nothing is ever exponentiated before it has
been shifted below zero: no overflow for small ``epsilon``, and no prototype row that underflows to
an all-zero row (and a 0/0) when all its scores are far below the batch maximum.  The constant
factors of the paper's algorithm (``1/K``, ``1/B`` and the initial division by the total) shift
every entry equally and cancel in the next normalisation, so they are not applied.

Distributed (``gather=True`` under an initialised ``torch.distributed`` group of world size
``W > 1``): the per-prototype normalisation needs sums over the *global* batch.  Each worker
computes the ``logsumexp`` of its own rows, the ``W`` partial results are all-gathered and reduced
with another ``logsumexp``.  The per-sample normalisation is local.  ``W`` workers with ``B`` rows
each therefore get the codes that one process computes on the ``W * B`` concatenated rows (up to
floating-point summation order).

Several score matrices of the same shape (SwAV's assigned crops) can be passed stacked,
``[..., B, K]``: each gets its own codes, in one set of kernels instead of one per matrix.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["sinkhorn", "world_size"]


def world_size() -> int:
    """Number of processes of the default group, 1 when ``torch.distributed`` is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _global_logsumexp_over_samples(log_q: torch.Tensor, gather: bool) -> torch.Tensor:
    """``logsumexp`` over the sample axis (dim -2) of the global batch, shape ``[..., 1, K]``."""
    local = torch.logsumexp(log_q, dim=-2, keepdim=True)
    if not gather or world_size() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.logsumexp(torch.stack(parts), dim=0)


@torch.no_grad()
def sinkhorn(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    gather: bool = True,
) -> torch.Tensor:
    """Soft cluster assignments (codes) of ``scores`` with equipartition over prototypes.

    Args:
        scores: ``[B, K]`` similarities of ``B`` samples to ``K`` prototypes (any float dtype),
            or a stack ``[..., B, K]`` of such matrices, each normalised on its own.
        epsilon: entropy regularisation; smaller is closer to a hard assignment (paper: 0.05).
        iterations: Sinkhorn-Knopp iterations (paper: 3).
        gather: when ``torch.distributed`` is initialised, normalise over the global batch.

    Returns:
        Codes of the shape of ``scores``, in float32 (float64 when ``scores`` is float64). Each
        row sums to 1; each column sums to ``B_global / K`` up to the convergence of
        ``iterations`` steps. No gradient flows through the codes.
    """
    if scores.dim() < 2:
        raise ValueError(f"scores: expected a [B, K] matrix (or a stack of them), got shape "
                         f"{tuple(scores.shape)}")
    if not epsilon > 0:
        raise ValueError(f"epsilon: must be > 0, got {epsilon}")
    if iterations < 1:
        raise ValueError(f"iterations: must be >= 1, got {iterations}")
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    log_q = scores.detach().to(dtype) / epsilon
    for _ in range(iterations):
        # Every prototype gets the same total mass over the global batch ...
        log_q = log_q - _global_logsumexp_over_samples(log_q, gather)
        # ... and every sample a unit of mass (local: a sample's row lives on one worker).
        log_q = log_q - torch.logsumexp(log_q, dim=-1, keepdim=True)
    return log_q.exp()
