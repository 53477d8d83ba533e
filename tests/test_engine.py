"""The training engine: prototype freezing, queue, resume, and a short run on real digits."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from swav.data import ArrayImageDataset, load_digits_arrays
from swav.engine import SwAVEngine
from swav.loss import SwAVLoss
from swav.model import build_model
from swav.multicrop import MultiCropTransform, multicrop_collate
from swav.optim import build_optimizer, build_scheduler


def _digits_loader(n: int, batch_size: int, seed: int = 0) -> DataLoader:
    images, labels = load_digits_arrays()
    transform = MultiCropTransform(
        nmb_crops=[2, 2], size_crops=[16, 12], min_scale_crops=[0.6, 0.4],
        max_scale_crops=[1.0, 0.8], mean=(0.5,) * 3, std=(0.5,) * 3, blur_prob=0.0,
        color_strength=0.5,
    )
    data = Subset(ArrayImageDataset(images, labels, transform), range(n))
    return DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True,
                      collate_fn=multicrop_collate, generator=torch.Generator().manual_seed(seed))


def _engine(total_steps: int, n_prototypes: int = 30, **kwargs) -> SwAVEngine:
    model = build_model("convnet", width=16, depth=3, hidden_dim=64, out_dim=32,
                        n_prototypes=n_prototypes)
    optimizer = build_optimizer(model, kwargs.pop("optimizer", "sgd"), lr=kwargs.pop("lr", 0.1),
                                weight_decay=1e-4)
    scheduler = build_scheduler(optimizer, total_steps=total_steps, warmup_steps=2)
    loss_fn = SwAVLoss(n_crops=4, crops_for_assign=[0, 1], temperature=0.1,
                       epsilon=kwargs.pop("epsilon", 0.05))
    return SwAVEngine(model, loss_fn, optimizer, scheduler, batch_size=kwargs.pop("batch_size", 32),
                      amp=False, **kwargs)


def test_frozen_prototypes_do_not_move_for_n_steps_then_do():
    torch.manual_seed(0)
    loader = _digits_loader(32 * 6, 32)
    engine = _engine(total_steps=6, freeze_prototypes_iters=3)
    protos = engine.net.prototypes.heads[0].weight
    head = engine.net.projection_head.net[0].weight
    start, head_start = protos.detach().clone(), head.detach().clone()
    batches = iter(loader)
    for _ in range(3):
        engine.step(next(batches)[0])
    # normalize_() re-projects unit vectors: identical up to float rounding, nothing more.
    torch.testing.assert_close(protos.detach(), start, atol=1e-7, rtol=0)
    assert (head.detach() - head_start).abs().max() > 1e-4  # the rest of the network trains
    assert all(s == {} for p, s in engine.optimizer.state.items() if p is protos)
    engine.step(next(batches)[0])
    assert (protos.detach() - start).abs().max() > 1e-4


def test_queue_starts_at_its_epoch_fills_and_then_is_used():
    torch.manual_seed(1)
    loader = _digits_loader(16 * 4, 16)  # 4 steps per epoch
    engine = _engine(total_steps=12, batch_size=16, queue_length=48, epoch_queue_starts=1)
    first = engine.train_epoch(loader, epoch=0)
    assert engine.queue is None and not first.queue_in_use
    second = engine.train_epoch(loader, epoch=1)  # 4 pushes of 16 rows fill the 48-row queue
    assert engine.queue is not None and engine.queue.length == 48 and second.queue_in_use
    assert engine.queue.buffer.shape == (2, 48, 32)


def test_resume_from_state_dict_gives_the_same_weights():
    def run(split: bool) -> dict:
        torch.manual_seed(2)
        loader = _digits_loader(16 * 3, 16, seed=5)
        engine = _engine(total_steps=9, batch_size=16, queue_length=32, epoch_queue_starts=1)
        engine.train_epoch(loader, epoch=0)
        if split:
            state = copy.deepcopy(engine.state_dict())
            rng = torch.get_rng_state()
            loader_rng = loader.generator.get_state()
            torch.manual_seed(123)  # a fresh process would start elsewhere
            engine = _engine(total_steps=9, batch_size=16, queue_length=32, epoch_queue_starts=1)
            engine.load_state_dict(state)
            torch.set_rng_state(rng)
            loader.generator.set_state(loader_rng)
        for epoch in (1, 2):
            engine.train_epoch(loader, epoch=epoch)
        return engine.net.state_dict()

    straight, resumed = run(split=False), run(split=True)
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_short_run_on_digits_lowers_the_loss_without_collapse():
    """Real images (scikit-learn digits): the loss falls from ~ln K and the codes keep using
    most prototypes (a collapsed model assigns everything to one or a few)."""
    torch.manual_seed(3)
    k = 100
    loader = _digits_loader(512, 64)
    epochs = 6
    engine = _engine(total_steps=epochs * len(loader), n_prototypes=k, batch_size=64,
                     optimizer="adamw", lr=2e-3, epsilon=0.03, freeze_prototypes_iters=len(loader))
    stats = [engine.train_epoch(loader, epoch=e) for e in range(epochs)]
    losses = [s.loss for s in stats]
    assert losses[0] > 0.9 * math.log(k)
    assert losses[-1] < losses[0] - 0.5
    assert stats[-1].prototypes_used >= 0.8 * k
    assert stats[-1].code_entropy > 0.8 * math.log(k)
    assert stats[-1].images == 512


def test_an_engine_whose_model_replays_cuda_graphs_marks_where_each_step_begins():
    """With CUDA graphs (``model.compile_mode=reduce-overhead``) torch must be told where each
    step begins (its own counter of marks, which it reads when it replays); without, never."""
    from torch._inductor.cudagraph_trees import MarkStepBox

    crops = [torch.rand(16, 3, 16, 16), torch.rand(16, 3, 12, 12)]
    for cuda_graphs, marks in ((False, 0), (True, 3)):
        engine = _engine(total_steps=4, batch_size=8, cuda_graphs=cuda_graphs)
        before = MarkStepBox.mark_step_counter
        engine.warm_up(crops)
        engine.step(crops)
        engine.step(crops)
        assert before - MarkStepBox.mark_step_counter == marks


def test_warm_up_compiles_forward_and_backward_and_changes_nothing():
    """``model.compile`` at set-up: ``warm_up`` makes every forward and backward graph of the
    training step's shapes (counted by the compiler's own hooks) and leaves weights, buffers,
    gradients, optimiser state and the iteration as they were; the first step compiles none."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    calls: list[str] = []

    def compiler(kind: str):
        def compile_graph(graph, example_inputs):
            calls.append(kind)
            return make_boxed_func(graph.forward)  # the graph as it is: no code generated
        return compile_graph

    backend = aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"))
    torch._dynamo.reset()
    engine = _engine(total_steps=4, optimizer="lars", batch_size=8)
    net = engine.net
    for module in (net.backbone, net.projection_head):  # as recipe.compile_model, any backend
        module.compile(dynamic=False, backend=backend)
    crops = [torch.rand(16, 3, 16, 16), torch.rand(16, 3, 12, 12)]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    engine.warm_up([torch.zeros_like(c) for c in crops])
    # Backbone: a graph per crop size; head: one for the concatenated features; each with its
    # backward.
    assert sorted(calls) == ["backward"] * 3 + ["forward"] * 3
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running statistics included
    assert all(p.grad is None for p in net.parameters()) and not engine.optimizer.state
    assert engine.iteration == 0 and engine.scheduler.last_epoch == 0
    loss, _ = engine.step(crops)
    assert len(calls) == 6 and torch.isfinite(loss)  # the first step compiled nothing
