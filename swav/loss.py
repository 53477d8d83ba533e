"""SwAV swapped-prediction loss (Caron et al., 2020, Eq. 1-3).

For every crop ``s`` in ``crops_for_assign`` the codes ``q_s`` come from Sinkhorn-Knopp on that
crop's prototype scores (optionally with queued rows in front).  Every *other* crop ``t`` then
predicts ``q_s`` from its own scores: ``-sum_k q_s[k] * log softmax(z_t . c / temperature)[k]``.
The loss averages over samples, over the ``n_crops - 1`` predicting crops, over the assigned crops
and over prototype heads.  Codes are targets: no gradient flows through them.

Scores are ordered crop-major: rows ``b*i ... b*(i+1)-1`` hold crop ``i`` of every image, as
produced by :func:`swav.multicrop.multicrop_collate` and :class:`swav.model.SwAVModel`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from swav.sinkhorn import sinkhorn

__all__ = ["SwAVLoss", "SwAVLossOutput"]


@dataclass
class SwAVLossOutput:
    loss: torch.Tensor
    codes: list[torch.Tensor]  # first head's codes, one [B, K] per crop in crops_for_assign


class SwAVLoss(nn.Module):
    """Swapped prediction with Sinkhorn-Knopp codes.

    Args:
        n_crops: total number of crops per image (all resolutions).
        crops_for_assign: indices of the crops whose codes are targets (paper: the two large ones).
        temperature: softmax temperature of the predictions (paper: 0.1).
        epsilon: Sinkhorn entropy regularisation (paper: 0.05; 0.03 for small batches/queues).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (paper: 3).
        gather: compute codes over the global batch under ``torch.distributed``.
    """

    def __init__(
        self,
        n_crops: int,
        crops_for_assign: Sequence[int] = (0, 1),
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        gather: bool = True,
    ) -> None:
        super().__init__()
        if n_crops < 2:
            raise ValueError(f"nmb_crops: SwAV needs at least 2 crops in total, got {n_crops}")
        if len(crops_for_assign) == 0:
            raise ValueError("crops_for_assign: must name at least one crop")
        bad = [c for c in crops_for_assign if not 0 <= c < n_crops]
        if bad:
            raise ValueError(f"crops_for_assign: {bad} out of range for {n_crops} crops")
        if len(set(crops_for_assign)) != len(crops_for_assign):
            raise ValueError(f"crops_for_assign: duplicate entries in {list(crops_for_assign)}")
        if not temperature > 0:
            raise ValueError(f"temperature: must be > 0, got {temperature}")
        if not epsilon > 0:
            raise ValueError(f"epsilon: must be > 0, got {epsilon}")
        if sinkhorn_iterations < 1:
            raise ValueError(f"sinkhorn_iterations: must be >= 1, got {sinkhorn_iterations}")
        self.n_crops = n_crops
        self.crops_for_assign = list(crops_for_assign)
        self.temperature = temperature
        self.epsilon = epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.gather = gather
        self._masks: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def codes(
        self,
        scores: torch.Tensor,
        batch_size: int,
        queue_scores: Sequence[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Codes ``[A, B, K]`` of the ``A`` crops in ``crops_for_assign``, all in one Sinkhorn call
        (a stack: one set of kernels, not one per crop), each over its queued rows (if given,
        ``[L, K]`` per crop) followed by its ``batch_size`` rows."""
        own = scores.detach().reshape(self.n_crops, batch_size, -1)
        first, count = self.crops_for_assign[0], len(self.crops_for_assign)
        if self.crops_for_assign == list(range(first, first + count)):
            own = own[first:first + count]  # a view (the usual crops 0 and 1)
        else:
            own = torch.stack([own[c] for c in self.crops_for_assign])
        if queue_scores is not None and any(q is not None for q in queue_scores):
            if any(q is None for q in queue_scores) or len(queue_scores) != count:
                raise ValueError(f"queue_scores: one [L, K] per assigned crop ({count}), or none")
            queued = torch.stack([q.detach() for q in queue_scores]).to(own.dtype)
            own = torch.cat([queued, own], dim=1)
        return sinkhorn(own, self.epsilon, self.sinkhorn_iterations, self.gather)[:, -batch_size:]

    def _head_loss(
        self,
        scores: torch.Tensor,
        batch_size: int,
        queue_scores: Sequence[torch.Tensor | None] | None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if scores.shape[0] != batch_size * self.n_crops:
            raise ValueError(
                f"scores: expected {self.n_crops} crops x {batch_size} rows, got {scores.shape[0]}"
            )
        # float32 at least (bf16/fp16 scores under autocast), float64 kept for exact checks.
        precise = scores if scores.dtype == torch.float64 else scores.float()
        log_p = F.log_softmax(precise / self.temperature, dim=1)
        log_p = log_p.view(self.n_crops, batch_size, -1)
        q = self.codes(scores, batch_size, queue_scores)  # [A, B, K]
        # cross[a, t]: cross-entropy of crop t's prediction against assigned crop a's codes,
        # averaged over the batch. One product per sample over the prototypes reads codes and
        # predictions once; the mean over samples is a separate (pairwise) sum. A single product
        # over samples and prototypes together accumulates B*K terms: 2e-4 off in float32.
        # In the scores' own precision: no autocast.
        with torch.autocast(scores.device.type, enabled=False):
            per_sample = torch.bmm(log_p.transpose(0, 1), q.permute(1, 2, 0))  # [B, n_crops, A]
        cross = -per_sample.mean(dim=0).T
        # Each assigned crop is predicted by every other crop: its own term is masked out (a
        # mask, not indexing by a list, which would copy the index to the GPU and wait for it).
        total = (cross * self._others(cross)).sum() / (self.n_crops - 1)
        return total / len(self.crops_for_assign), list(q.unbind(0))

    def _others(self, like: torch.Tensor) -> torch.Tensor:
        """``[A, n_crops]``: 1, except 0 at each assigned crop's own column; made once per device
        and dtype (filled on the device: no host copy)."""
        key = (like.device, like.dtype)
        if key not in self._masks:
            mask = torch.ones(like.shape, device=like.device, dtype=like.dtype)
            for a, crop in enumerate(self.crops_for_assign):
                mask[a, crop] = 0.0
            self._masks[key] = mask
        return self._masks[key]

    def forward(
        self,
        scores: torch.Tensor | Sequence[torch.Tensor],
        batch_size: int,
        queue_scores: Sequence[Sequence[torch.Tensor | None] | None] | None = None,
    ) -> SwAVLossOutput:
        """Loss over one or several prototype heads.

        Args:
            scores: ``[n_crops * B, K]`` crop-major scores, or a list of them (one per head).
            batch_size: ``B``, images per crop on this worker.
            queue_scores: per head, per assigned crop, ``[L, K]`` scores of queued embeddings
                against the current prototypes (or ``None`` while the queue is not in use).
        """
        heads = [scores] if isinstance(scores, torch.Tensor) else list(scores)
        losses, first_codes = [], []
        for h, head_scores in enumerate(heads):
            loss, codes = self._head_loss(
                head_scores, batch_size, queue_scores[h] if queue_scores else None
            )
            losses.append(loss)
            if h == 0:
                first_codes = codes
        return SwAVLossOutput(torch.stack(losses).mean(), first_codes)
