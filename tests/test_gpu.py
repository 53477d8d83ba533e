"""CUDA paths (run on a GPU machine; skipped elsewhere): bf16 autocast step and Sinkhorn on GPU."""

from __future__ import annotations

import math

import pytest
import torch

from swav.engine import SwAVEngine
from swav.loss import SwAVLoss
from swav.model import build_model
from swav.optim import build_optimizer, build_scheduler
from swav.sinkhorn import sinkhorn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_sinkhorn_on_gpu_with_bf16_scores_matches_cpu_float64():
    torch.manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(512, 128), dim=1) @ \
        torch.nn.functional.normalize(torch.randn(300, 128), dim=1).t()
    low = scores.bfloat16()
    gpu = sinkhorn(low.cuda(), epsilon=0.01, iterations=3)
    assert gpu.dtype == torch.float32 and torch.isfinite(gpu).all()
    torch.testing.assert_close(gpu.cpu().double(), sinkhorn(low.double(), 0.01, 3), atol=1e-5, rtol=1e-4)


def test_loss_on_gpu_with_bf16_scores_matches_cpu_float64():
    # The stacked Sinkhorn and the batched cross-entropy product (cuBLAS on strided views).
    torch.manual_seed(5)
    b, k = 256, 3000
    scores = torch.nn.functional.normalize(torch.randn(6 * b, k), dim=1) * 8
    low = scores.bfloat16()
    loss_fn = SwAVLoss(n_crops=6, crops_for_assign=[0, 1])
    with torch.autocast("cuda", dtype=torch.bfloat16):  # as if called inside a bf16 region
        gpu = loss_fn(low.cuda(), b)
    cpu = loss_fn(low.double(), b)
    assert gpu.loss.dtype == torch.float32
    assert gpu.loss.item() == pytest.approx(cpu.loss.item(), rel=1e-5)
    for q_gpu, q_cpu in zip(gpu.codes, cpu.codes):
        torch.testing.assert_close(q_gpu.cpu().double(), q_cpu, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_step_trains_and_keeps_float32_master_weights():
    torch.manual_seed(1)
    device = torch.device("cuda")
    model = build_model("resnet18", cifar_stem=True, hidden_dim=256, out_dim=64,
                        n_prototypes=100).to(device)
    optimizer = build_optimizer(model, "lars", lr=0.5, weight_decay=1e-6)
    scheduler = build_scheduler(optimizer, total_steps=10)
    loss_fn = SwAVLoss(n_crops=4, crops_for_assign=[0, 1], epsilon=0.03)
    engine = SwAVEngine(model, loss_fn, optimizer, scheduler, device=device, batch_size=32,
                        queue_length=64, epoch_queue_starts=0, amp=True)
    engine.start_queue(0)
    seen = {}

    def record_dtype(module, inputs, output) -> None:  # a hook returning a value replaces output
        seen.setdefault("dtype", output.dtype)

    hook = model.prototypes.heads[0].register_forward_hook(record_dtype)
    before = model.backbone.conv1.weight.detach().clone()
    crops = [torch.randn(64, 3, 32, 32), torch.randn(64, 3, 16, 16)]
    losses = [float(engine.step(crops)[0]) for _ in range(4)]
    hook.remove()
    assert seen["dtype"] == torch.bfloat16
    assert all(torch.isfinite(torch.tensor(losses)))
    assert model.backbone.conv1.weight.dtype == torch.float32
    assert (model.backbone.conv1.weight.detach() - before).abs().max() > 0
    assert engine.queue.full  # 4 pushes of 32 rows filled the 64-row queue, then it is scored


def test_channels_last_step_matches_the_default_layout():
    """Same weights, same batch: one step in channels-last gives the same loss (fp32, no autocast)."""
    torch.manual_seed(2)
    crops = [torch.randn(32, 3, 32, 32), torch.randn(32, 3, 16, 16)]
    losses = []
    for channels_last in (False, True):
        torch.manual_seed(3)
        model = build_model("resnet18", cifar_stem=True, hidden_dim=128, out_dim=32,
                            n_prototypes=50).cuda()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, "sgd", lr=0.1)
        engine = SwAVEngine(model, SwAVLoss(n_crops=4), optimizer,
                            build_scheduler(optimizer, total_steps=2), device="cuda",
                            batch_size=16, amp=False, channels_last=channels_last)
        losses.append(float(engine.step(crops)[0]))
    assert abs(losses[0] - losses[1]) < 1e-2 * abs(losses[0])


def test_model_compile_steps_like_the_eager_model():
    """``model.compile`` (backbone and head compiled in place): the same losses over 3 steps as
    the eager engine from the same weights (fp32, no autocast), and the same state-dict keys."""
    from orchestration.preflight import load_experiment
    from orchestration.recipe import build_engine

    crops = [torch.randn(32, 3, 32, 32), torch.randn(32, 3, 16, 16)]
    losses, keys = [], []
    for compiled in (False, True):
        cfg = load_experiment(None, ["model.backbone=resnet18", "model.cifar_stem=true",
                                 "model.n_prototypes=50", "crops.nmb_crops=[2,2]",
                                 "crops.size_crops=[32,16]", "crops.min_scale_crops=[0.14,0.05]",
                                 "crops.max_scale_crops=[1.0,0.14]", "optim.name=sgd",
                                 f"model.compile={compiled}", "swav.freeze_prototypes_iters=0"])
        engine = build_engine(cfg, 3, torch.device("cuda"), 16, amp=False)
        losses.append([float(engine.step(crops)[0]) for _ in range(3)])
        keys.append(list(engine.net.state_dict()))
    assert keys[0] == keys[1]
    for eager, fused in zip(*losses):
        assert fused == pytest.approx(eager, rel=1e-3)


def test_batched_crops_on_the_gpu_compiled_equal_eager_and_stay_on_the_gpu():
    from swav.batch_multicrop import BatchMultiCrop

    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(4)).cuda()
    args = ([2, 4], [32, 16], [0.14, 0.05], [1.0, 0.14])
    eager = BatchMultiCrop(*args, seed=7, memory_format=torch.channels_last)
    fused = BatchMultiCrop(*args, seed=7, memory_format=torch.channels_last, compile=True)
    for _ in range(2):
        for a, b in zip(eager(images), fused(images)):
            assert b.is_cuda and b.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(b, a, atol=1e-4, rtol=0)


def test_a_run_compiles_its_crops_and_model_while_it_is_set_up():
    """``crops.compile`` and ``model.compile``: build_training compiles the crops and the model
    (their warm_up), so the first epoch, whose time plans a run with a budget and counts in it,
    compiles nothing."""
    from torch._dynamo.utils import counters

    from orchestration.preflight import load_experiment
    from orchestration.recipe import build_training

    before = counters["stats"]["unique_graphs"]
    torch.backends.cudnn.benchmark = False
    training = build_training(load_experiment(None, ["crops.compile=true", "model.compile=true"]),
                              device="cuda")
    assert training.augment is not None and training.augment.compiled
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > before
    training.run_epoch(0)
    assert counters["stats"]["unique_graphs"] == compiled
    assert torch.backends.cudnn.benchmark  # set by the run: model.cudnn_benchmark, on by default


def test_an_epoch_on_the_gpu_never_waits_for_it_between_steps():
    """What ``test_recipe``'s recorder checks on the CPU, on the GPU itself: from the first step's
    end to the last's, no operation synchronises with the device (copies to the host included);
    its figures are read once, after the last step."""
    from orchestration.preflight import load_experiment
    from orchestration.recipe import build_training

    training = build_training(load_experiment(None, ["optim.name=lars", "swav.queue_length=128",
                                                 "swav.epoch_queue_starts=0"]), device="cuda")
    training.run_epoch(0)  # compiles, autotunes and fills the queue
    last = training.engine.iteration + training.steps_per_epoch
    assert training.steps_per_epoch >= 3

    def on_step(iteration: int, loss: torch.Tensor) -> None:
        torch.cuda.set_sync_debug_mode("error" if iteration < last else "default")

    try:
        stats = training.run_epoch(1, on_step=on_step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats.queue_in_use and math.isfinite(stats.loss)


def test_model_compiled_to_replay_cuda_graphs_steps_like_the_eager_model():
    """``model.compile_mode=reduce-overhead``: the compiled forward and backward are replayed as
    CUDA graphs (``cudaGraphLaunch`` in the step's profile), with the eager engine's losses over
    4 steps from the same weights (fp32; the first steps record the graphs, later ones replay)."""
    from torch.profiler import ProfilerActivity, profile

    from orchestration.preflight import load_experiment
    from orchestration.recipe import build_engine

    # Every module compiled in place shares one cache of 8 compiled entries per process, and the
    # compiling tests before this one fill most of it: past it, torch runs the module eagerly.
    torch._dynamo.reset()
    crops = [torch.randn(32, 3, 32, 32), torch.randn(32, 3, 16, 16)]
    losses, launches = [], []
    for mode in ("off", "reduce-overhead"):
        compiled = [] if mode == "off" else ["model.compile=true", f"model.compile_mode={mode}"]
        cfg = load_experiment(None, ["model.backbone=convnet", "model.n_prototypes=50",
                                 "model.hidden_dim=64", "crops.nmb_crops=[2,2]",
                                 "crops.size_crops=[32,16]", "crops.min_scale_crops=[0.14,0.05]",
                                 "crops.max_scale_crops=[1.0,0.14]", "optim.name=sgd",
                                 "swav.freeze_prototypes_iters=0", *compiled])
        engine = build_engine(cfg, 5, torch.device("cuda"), 16, amp=False)
        assert engine.cuda_graphs == (mode != "off")
        losses.append([float(engine.step(crops)[0]) for _ in range(4)])
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine.step(crops)
            torch.cuda.synchronize()
        launches.append(sum("cudaGraphLaunch" in e.name for e in prof.events()))
    assert launches[0] == 0 and launches[1] >= 2  # (forward and backward graphs at least)
    for eager, graphed in zip(*losses):
        assert graphed == pytest.approx(eager, rel=1e-3)
