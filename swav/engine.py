"""The SwAV training loop: one step and one epoch, shared by every caller.

A step (facebookresearch/swav ``main_swav.py`` order):

1. re-normalise the prototypes onto the unit sphere;
2. forward all crops (bf16 autocast on GPU), one backbone pass per resolution;
3. score the queued embeddings against the current prototypes, then push this batch's embeddings
   of the assigned crops into the queue;
4. swapped-prediction loss with Sinkhorn-Knopp codes (float32, gathered across workers);
5. backward; while ``iteration < freeze_prototypes_iters`` the prototypes' gradients are dropped
   (``grad = None``) so that neither the optimiser's step nor its weight decay moves them;
6. optimiser step and per-iteration learning-rate schedule.

The engine knows nothing of Ray or MLflow.  It works with a plain model or one wrapped in
``DistributedDataParallel``; under ``torch.distributed`` the epoch statistics are summed over
workers so that every rank reports the same figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from swav.data import Batch
from swav.loss import SwAVLoss
from swav.model import SwAVModel
from swav.queue import FeatureQueue, per_worker_length
from swav.sinkhorn import world_size

__all__ = ["EpochStats", "SwAVEngine", "convert_sync_batchnorm", "unwrap"]


def unwrap(model: nn.Module) -> SwAVModel:
    """The SwAV model inside a ``DistributedDataParallel`` (or similar ``.module``) wrapper."""
    return getattr(model, "module", model)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Use SyncBatchNorm across workers (GPU only: the CPU/gloo path has no SyncBatchNorm)."""
    if world_size() > 1 and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


@dataclass
class EpochStats:
    """Figures of one epoch, identical on every rank (summed over workers)."""

    epoch: int
    loss: float
    lr: float
    images: int
    seconds: float
    images_per_s: float
    prototypes_used: int
    code_entropy: float  # nats, of the hard assignments' distribution over prototypes
    queue_in_use: bool
    corrupt_images: int = 0  # undecodable images dropped (and replaced) by the collate


def _sum_over_workers(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    if world_size() > 1:
        values = values.to(device)
        dist.all_reduce(values)
    return values.cpu()


class SwAVEngine:
    """Owns the mutable training state: model, optimiser, schedule, queue and iteration count.

    Args:
        model: a :class:`SwAVModel`, possibly wrapped in DDP.
        loss_fn: the :class:`SwAVLoss`.
        optimizer, scheduler: built by :mod:`swav.optim`; the scheduler steps every iteration.
        device: where batches go.
        batch_size: images per worker per step (sets the per-worker queue length).
        queue_length: global queue length (0: no queue); rounded to a multiple of the global batch.
        epoch_queue_starts: first epoch that fills and uses the queue.
        freeze_prototypes_iters: iterations during which the prototypes do not move.
        amp: bf16 autocast on CUDA (ignored on CPU).
        channels_last: feed crops in channels-last memory format (convert the model likewise,
            before wrapping it in DDP), which GPU convolutions run faster on (BENCHMARKS.md).
        cuda_graphs: the model is compiled to replay CUDA graphs (torch.compile's
            ``reduce-overhead``): each step marks where it begins, which tells torch that the
            last step's graph outputs are no longer read and may be overwritten.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: SwAVLoss,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
        queue_length: int = 0,
        epoch_queue_starts: int = 15,
        freeze_prototypes_iters: int = 0,
        amp: bool = True,
        channels_last: bool = False,
        cuda_graphs: bool = False,
    ) -> None:
        if freeze_prototypes_iters < 0:
            raise ValueError(f"freeze_prototypes_iters: must be >= 0, got {freeze_prototypes_iters}")
        if epoch_queue_starts < 0:
            raise ValueError(f"epoch_queue_starts: must be >= 0, got {epoch_queue_starts}")
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.queue_length = per_worker_length(queue_length, batch_size, world_size())
        self.epoch_queue_starts = epoch_queue_starts
        self.freeze_prototypes_iters = freeze_prototypes_iters
        self.amp = amp and self.device.type == "cuda"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.cuda_graphs = cuda_graphs
        self.queue: FeatureQueue | None = None
        self.iteration = 0

    @property
    def net(self) -> SwAVModel:
        return unwrap(self.model)

    # -- queue -------------------------------------------------------------------------------
    def start_queue(self, epoch: int) -> None:
        """Create the (empty) queue if it is due at ``epoch`` (``epoch_queue_starts``)."""
        if self.queue is None and self.queue_length > 0 and epoch >= self.epoch_queue_starts:
            self.queue = FeatureQueue(
                len(self.loss_fn.crops_for_assign), self.queue_length,
                self.net.prototypes.heads[0].in_features,
            )

    def _queue_scores(self, embeddings: torch.Tensor, batch_size: int):
        """Scores of the queued rows (current prototypes), then push this batch. None if unused."""
        if self.queue is None:
            return None
        scores = None
        if self.queue.full:
            with torch.no_grad():
                scores = [
                    [head(self.queue.embeddings(i).to(embeddings.device, head.weight.dtype))
                     for i in range(len(self.loss_fn.crops_for_assign))]
                    for head in self.net.prototypes.heads
                ]
        self.queue.push(
            [embeddings[batch_size * c: batch_size * (c + 1)] for c in self.loss_fn.crops_for_assign]
        )
        return scores

    # -- one step ----------------------------------------------------------------------------
    def _begin_step(self, crops: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        """The crops on the device in the model's memory format, and the images per crop; a
        compiled model that replays CUDA graphs is told that a step begins."""
        crops = [c.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
                 for c in crops]
        rows = sum(c.shape[0] for c in crops)
        if rows % self.loss_fn.n_crops:
            raise ValueError(f"crops: {rows} rows is not a multiple of {self.loss_fn.n_crops} crops")
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return crops, rows // self.loss_fn.n_crops

    def step(self, crops: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One optimisation step on a batch of crops grouped by resolution. Returns (loss, codes)."""
        crops, batch_size = self._begin_step(crops)
        self.net.prototypes.normalize_()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            embeddings, scores = self.model(crops)
        queue_scores = self._queue_scores(embeddings, batch_size)
        out = self.loss_fn(scores, batch_size, queue_scores)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.iteration < self.freeze_prototypes_iters:
            for p in self.net.prototypes.parameters():
                p.grad = None
        self.optimizer.step()
        self.scheduler.step()
        self.iteration += 1
        return out.loss.detach(), out.codes

    def warm_up(self, crops: Sequence[torch.Tensor]) -> None:
        """One forward and backward pass on ``crops`` (only their shapes matter) that leaves
        every weight, buffer, gradient and optimiser state as it was: a model compiled with
        static shapes (``model.compile``) compiles now, at set-up, rather than in the first
        training step. Under DDP every worker must call it, as every worker steps."""
        kept = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        crops, batch_size = self._begin_step(crops)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            _, scores = self.model(crops)
        self.loss_fn(scores, batch_size).loss.backward()  # the training step's backward graph
        self.optimizer.zero_grad(set_to_none=True)
        self.net.load_state_dict(kept)  # (batch norm's running statistics moved)

    # -- one epoch ---------------------------------------------------------------------------
    def train_epoch(
        self,
        loader: Iterable,
        epoch: int,
        on_step: Callable[[int, torch.Tensor], None] | None = None,
    ) -> EpochStats:
        """Train over ``loader``: :class:`swav.data.Batch`, ``(crop_groups, labels)`` or groups.

        ``on_step(iteration, loss)`` gets the loss as a device tensor (``float()`` it only when
        needed: each conversion waits for the GPU)."""
        self.model.train()
        self.start_queue(epoch)
        k = self.net.prototypes.sizes[0]
        # Figures accumulate on the device: no host synchronisation inside the loop.
        counts = torch.zeros(k, dtype=torch.long, device=self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        steps, images, corrupt = 0, 0, 0
        lr = self.optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        for batch in loader:
            if isinstance(batch, Batch):
                crops, corrupt = batch.crops, corrupt + batch.corrupt
            else:
                crops = batch[0] if isinstance(batch, tuple) else batch
            lr = self.optimizer.param_groups[0]["lr"]
            loss, codes = self.step(crops)
            assigned = codes[0].argmax(dim=1)  # (bincount would wait for the GPU to size itself)
            counts.index_add_(0, assigned, torch.ones_like(assigned))
            loss_sum += loss
            steps += 1
            images += codes[0].shape[0]
            if on_step is not None:
                on_step(self.iteration, loss)
        seconds = time.perf_counter() - start
        totals = _sum_over_workers(
            torch.tensor([loss_sum.item(), steps, images, corrupt], dtype=torch.float64),
            self.device)
        counts = _sum_over_workers(counts.double(), self.device)
        return EpochStats(
            epoch=epoch,
            loss=float(totals[0] / max(totals[1], 1)),
            lr=lr,
            images=int(totals[2]),
            seconds=seconds,
            images_per_s=float(totals[2]) / seconds if seconds > 0 else 0.0,
            prototypes_used=int((counts > 0).sum()),
            code_entropy=_entropy(counts),
            queue_in_use=self.queue is not None and self.queue.full,
            corrupt_images=int(totals[3]),
        )

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "queue": None if self.queue is None else self.queue.state_dict(),
            "iteration": self.iteration,
        }

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.iteration = int(state["iteration"])
        self.queue = None
        if state.get("queue") is not None:
            q = state["queue"]
            self.queue = FeatureQueue(q["buffer"].shape[0], q["buffer"].shape[1], q["buffer"].shape[2])
            self.queue.load_state_dict(q)


def _entropy(counts: torch.Tensor) -> float:
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * p.log()).sum()) if len(p) else 0.0
