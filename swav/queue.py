"""Feature queue for SwAV's small-batch training (Caron et al., 2020, Sec. 4 and Appendix A.1).

With small batches the equipartition constraint of Sinkhorn-Knopp acts on too few samples.  SwAV
keeps the projected embeddings of the last few batches and scores them against the *current*
prototypes at every step, so the codes are computed over ``queue + batch`` rows; only the
batch's own codes are used in the loss.

Semantics follow the official implementation: the queue is per worker (its length is the global
length divided by the world size), holds one slot array per crop in ``crops_for_assign``, is
created at ``epoch_queue_starts`` and is used only once it is full (and from then on always).
Embeddings are stored, not scores, so that they are re-scored against the prototypes of the
current step.
"""

from __future__ import annotations

import torch

__all__ = ["FeatureQueue", "per_worker_length"]


def per_worker_length(queue_length: int, batch_size: int, world_size: int) -> int:
    """Per-worker queue length: the global length rounded down to a multiple of the global batch.

    Rounding makes the queue shift by whole batches, as in the official code.
    """
    if queue_length < 0:
        raise ValueError(f"queue_length: must be >= 0, got {queue_length}")
    global_batch = batch_size * world_size
    return (queue_length - queue_length % global_batch) // world_size


class FeatureQueue:
    """First-in-first-out buffer of ``[n_views, length, dim]`` embeddings.

    ``push`` inserts the newest batch at the front; ``full`` is true once ``length`` rows have been
    pushed.  Rows are stored in float32 on the device of the first push.
    """

    def __init__(self, n_views: int, length: int, dim: int) -> None:
        if n_views < 1:
            raise ValueError(f"crops_for_assign: the queue needs at least one view, got {n_views}")
        if length < 0:
            raise ValueError(f"queue_length: must be >= 0, got {length}")
        if dim < 1:
            raise ValueError(f"dim: must be >= 1, got {dim}")
        self.buffer = torch.zeros(n_views, length, dim)
        self.filled = 0

    @property
    def length(self) -> int:
        return self.buffer.shape[1]

    @property
    def full(self) -> bool:
        return self.length > 0 and self.filled >= self.length

    def push(self, embeddings: list[torch.Tensor] | torch.Tensor) -> None:
        """Insert one batch ``[B, dim]`` per view at the front, dropping the oldest rows."""
        if self.length == 0:
            return
        new = torch.stack([e.detach().float() for e in embeddings])
        if new.shape[0] != self.buffer.shape[0] or new.shape[2] != self.buffer.shape[2]:
            raise ValueError(
                f"embeddings: expected {self.buffer.shape[0]} views of dim {self.buffer.shape[2]}, "
                f"got shape {tuple(new.shape)}"
            )
        self.buffer = self.buffer.to(new.device)
        n = min(new.shape[1], self.length)
        self.buffer = torch.cat([new[:, :n], self.buffer[:, : self.length - n]], dim=1)
        self.filled = min(self.filled + n, self.length)

    def embeddings(self, view: int) -> torch.Tensor:
        """All queued embeddings of one view, newest first, ``[length, dim]``."""
        return self.buffer[view]

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.cpu(), "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = state["buffer"].clone()
        self.filled = int(state["filled"])
