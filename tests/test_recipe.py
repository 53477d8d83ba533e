"""The composition root: one config -> the components every runner trains with."""

from __future__ import annotations

import math

import pytest
import torch

from orchestration.config import RESUMABLE, ConfigError
from orchestration.preflight import load_experiment
from orchestration.recipe import (
    batch_crop_transform,
    build_engine,
    build_training,
    compile_model,
    crops_on_device,
    eval_loaders,
    eval_sets,
    initial_model,
    model_kwargs,
    open_splits,
    per_process_batch,
    replays_cuda_graphs,
    use_cudnn_benchmark,
)
from swav.raw_batches import ResidentBatches

TINY = ["data.limit=256", "optim.epochs=2", "optim.batch_size=32", "model.width=8",
        "model.hidden_dim=32", "model.out_dim=16", "model.n_prototypes=20",
        "swav.freeze_prototypes_iters=2", "optim.warmup_epochs=1"]


def test_the_global_batch_is_split_over_the_processes_that_train():
    cfg = load_experiment(None, ["optim.batch_size=32", "scaling.num_workers=2"])
    assert per_process_batch(cfg, 1) == 64  # one process: the whole global batch
    assert per_process_batch(cfg, 2) == 32
    assert per_process_batch(cfg, 4) == 16
    with pytest.raises(ValueError, match="^optim.batch_size: the global batch of 64"):
        per_process_batch(cfg, 3)


def test_one_process_trains_on_the_global_batch_from_the_seeded_initialisation():
    cfg = load_experiment(None, TINY)
    training = build_training(cfg)
    crops = training._crops(next(iter(training.loader))).crops  # crops.device auto: batched
    assert [c.shape[0] for c in crops] == [2 * 64, 4 * 64]  # 2 + 4 crops of 64 images
    assert training.steps_per_epoch == 256 // 64
    assert training.engine.batch_size == 64
    start = initial_model(cfg).state_dict()
    for name, value in training.engine.net.state_dict().items():
        torch.testing.assert_close(value, start[name], rtol=0, atol=0, msg=name)
    stats = training.run_epoch(0)
    assert stats.images == 256 and stats.epoch == 0
    bank_loader, held_loader, n_classes = training.evaluation
    assert n_classes == 10 and len(bank_loader.loader.dataset) == 256


def test_each_worker_gets_its_own_shard_and_the_same_shuffle_after_a_resume():
    cfg = load_experiment(None, [*TINY, "crops.device=cpu"])  # a DataLoader over the shard's rows
    rank0, rank1 = build_training(cfg, 0, 2), build_training(cfg, 1, 2)
    assert rank0.loader.batch_size == rank1.loader.batch_size == 32
    rows0, rows1 = set(rank0.loader.dataset.base.indices), set(rank1.loader.dataset.base.indices)
    assert len(rows0) == len(rows1) == 128 and not rows0 & rows1
    order = list(rank0.loader.batch_sampler.sampler.__iter__())  # the generator as left
    rank0.loader.generator.manual_seed((cfg.scaling.seed + 0) * 100_003 + 1)
    first = list(iter(rank0.loader.batch_sampler.sampler))
    rank0.loader.generator.manual_seed((cfg.scaling.seed + 0) * 100_003 + 1)
    again = list(iter(rank0.loader.batch_sampler.sampler))
    assert first == again and len(order) == 128


def test_the_evaluation_bank_is_an_evenly_spaced_subset_of_the_training_images():
    cfg = load_experiment(None, ["eval.max_train_images=100"])
    splits = open_splits(cfg)
    sets = eval_sets(cfg, splits)
    assert len(sets.bank) == 100 and len(sets.heldout) == 359 and sets.n_classes == 10
    step = len(splits.train) / 100
    assert sets.bank.base.indices == [int(i * step) for i in range(100)]  # rows of the train set
    assert sets.bank.base.dataset is splits.train
    bank, held = eval_loaders(cfg, sets, rank=1, world=2)
    assert len(bank.dataset) == 50 and len(held.dataset) == 179


def test_crops_on_the_device_follow_the_crops_device_switch():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # (a streamed shard on the CPU, a resident one on the CPU, any on a GPU)
    for value, expected in (("auto", (False, True, True)), ("cpu", (False, False, False)),
                            ("gpu", (True, True, True))):
        cfg = load_experiment(None, [f"crops.device={value}"])
        assert (crops_on_device(cfg, cpu), crops_on_device(cfg, cpu, resident=True),
                crops_on_device(cfg, cuda)) == expected, value
    with pytest.raises(ConfigError, match="^crops.device: expected auto, cpu, gpu, got 'tpu'"):
        load_experiment(None, ["crops.device=tpu"])


def test_crops_compile_fuses_the_augmentation_on_a_gpu_only():
    cfg = load_experiment(None, ["crops.compile=true"])
    assert batch_crop_transform(cfg, torch.device("cuda")).compiled  # (compiled on first use)
    assert not batch_crop_transform(cfg, torch.device("cpu")).compiled  # no faster there
    assert not batch_crop_transform(load_experiment(None, []), torch.device("cuda")).compiled


def test_model_compile_compiles_backbone_and_head_in_place_on_a_gpu_only():
    cfg = load_experiment(None, ["model.compile=true"])
    model = initial_model(cfg)
    keys = list(model.state_dict())
    assert not compile_model(model, cfg, torch.device("cpu"))  # (compiling is lazy: no GPU needed)
    assert model.backbone._compiled_call_impl is None
    assert compile_model(model, cfg, torch.device("cuda"))
    assert model.backbone._compiled_call_impl is not None
    assert model.projection_head._compiled_call_impl is not None
    assert list(model.state_dict()) == keys  # checkpoints load into an uncompiled model
    assert not compile_model(initial_model(cfg), load_experiment(None, []), torch.device("cuda"))
    # Not part of the architecture: evaluate and explain rebuild the same model without it.
    assert "compile" not in model_kwargs(cfg)


def test_model_compile_mode_is_checked_and_its_cuda_graph_modes_mark_every_step():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    graphs = {"default": False, "reduce-overhead": True, "max-autotune": True,
              "max-autotune-no-cudagraphs": False}
    for mode, replays in graphs.items():
        cfg = load_experiment(None, ["model.compile=true", f"model.compile_mode={mode}"])
        assert replays_cuda_graphs(cfg, cuda) is replays, mode
        assert not replays_cuda_graphs(cfg, cpu)  # (a CPU run compiles nothing)
    cfg = load_experiment(None, [*TINY, "model.compile=true", "model.compile_mode=reduce-overhead"])
    assert not build_engine(cfg, 4, cpu, 8).cuda_graphs
    # How it runs, not what it computes; a resume may change it.
    assert "compile_mode" not in model_kwargs(cfg)
    assert "model.compile_mode".startswith(RESUMABLE)
    with pytest.raises(ConfigError, match="^model.compile_mode: expected default, reduce-overhead, "
                                          "max-autotune, max-autotune-no-cudagraphs, got 'fast'$"):
        load_experiment(None, ["model.compile=true", "model.compile_mode=fast"])
    gpus = ["scaling.use_gpu=true", "scaling.num_workers=2"]
    with pytest.raises(ConfigError, match=r"^model.compile_mode: max-autotune replays CUDA graphs, "
                                          r"on one GPU worker only; got scaling.num_workers=2 "
                                          r"\(model.compile_mode=default compiles for more\)$"):
        load_experiment(None, ["model.compile=true", "model.compile_mode=max-autotune", *gpus])
    load_experiment(None, ["model.compile=true", "model.compile_mode=max-autotune-no-cudagraphs", *gpus])
    # The mode of model.compile: model.compile=false alone turns an experiment's compiling off
    # (cifar10_wallclock replays CUDA graphs), on any number of workers.
    eager = load_experiment("cifar10_wallclock", ["model.compile=false", "data.path=/tmp", *gpus])
    assert not replays_cuda_graphs(eager, cuda)
    assert replays_cuda_graphs(load_experiment("cifar10_wallclock", ["data.path=/tmp"]), cuda)


def test_cudnn_benchmark_is_set_for_a_process_that_trains_on_a_gpu():
    was = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        on, off = load_experiment(None, []), load_experiment(None, ["model.cudnn_benchmark=false"])
        assert not use_cudnn_benchmark(on, torch.device("cpu"))  # a CPU run leaves it alone
        assert use_cudnn_benchmark(on, torch.device("cuda"))  # (a flag: no GPU needed to set it)
        assert torch.backends.cudnn.benchmark
        assert not use_cudnn_benchmark(off, torch.device("cuda"))
        assert not torch.backends.cudnn.benchmark
        build_engine(on, 4, torch.device("cpu"), 8)
        assert not torch.backends.cudnn.benchmark
        # How it runs, not what it computes: evaluate and explain rebuild the same model, and
        # a resume may change it.
        assert "cudnn_benchmark" not in model_kwargs(on)
        assert "model.cudnn_benchmark" in RESUMABLE
    finally:
        torch.backends.cudnn.benchmark = was


def test_an_epoch_on_the_gpu_path_reads_nothing_back_until_it_ends(host_reads):
    """The GPU path (resident uint8 images, crops made on the device, LARS, a queue in use,
    frozen then free prototypes) never makes the host wait for the device inside the epoch
    (checked on the CPU: the same code); its figures are read once, after the last step."""
    cfg = load_experiment(None, [*TINY, "crops.device=gpu", "optim.name=lars", "optim.epochs=3",
                             "swav.queue_length=64", "swav.epoch_queue_starts=0"])
    training = build_training(cfg)
    assert isinstance(training.loader, ResidentBatches) and training.augment is not None
    training.run_epoch(0)  # (fills the queue: it is used from the first step below)
    assert training.engine.queue.full
    reads, after_step = host_reads(), []
    with reads:
        stats = training.run_epoch(1, on_step=lambda it, loss: after_step.append(len(reads.seen)))
    assert len(after_step) == training.steps_per_epoch and set(after_step) == {0}
    assert reads.seen  # the epoch's figures, read at its end (the recorder sees reads)
    assert stats.queue_in_use and math.isfinite(stats.loss)


def test_crops_on_the_device_train_from_resident_uint8_images_reproducibly():
    cfg = load_experiment(None, [*TINY, "crops.device=gpu"])
    runs = []
    for _ in range(2):
        training = build_training(cfg)
        assert isinstance(training.loader, ResidentBatches) and training.augment is not None
        assert tuple(training.loader.images.shape[1:]) == (3, 8, 8)  # the digits, decoded once
        assert training.steps_per_epoch == 256 // 64
        stats = [training.run_epoch(epoch) for epoch in range(2)]
        assert stats[0].images == 256 and stats[0].corrupt_images == 0
        runs.append([s.loss for s in stats])
    assert runs[0] == runs[1]  # shuffle and crops are functions of (seed, rank, epoch)
    assert runs[0][1] < runs[0][0]
    crops = training._crops(next(iter(training.loader))).crops
    assert [tuple(c.shape) for c in crops] == [(2 * 64, 3, 16, 16), (4 * 64, 3, 12, 12)]


def test_on_the_cpu_auto_crops_a_resident_shard_batched_and_a_streamed_one_with_pil(
        monkeypatch):
    import orchestration.recipe as recipe

    cfg = load_experiment(None, TINY)  # crops.device: auto
    training = build_training(cfg)
    assert isinstance(training.loader, ResidentBatches) and training.augment is not None
    assert training.run_epoch(0).images == 256
    pil = build_training(load_experiment(None, [*TINY, "crops.device=cpu"]))
    assert isinstance(pil.loader, torch.utils.data.DataLoader) and pil.augment is None
    monkeypatch.setattr(recipe, "resident_images", lambda *args, **kwargs: None)  # too large
    training = build_training(cfg)
    assert isinstance(training.loader, torch.utils.data.DataLoader) and training.augment is None
    crops = next(iter(training.loader)).crops  # made by the PIL transform
    assert [tuple(c.shape) for c in crops] == [(2 * 64, 3, 16, 16), (4 * 64, 3, 12, 12)]


def test_crops_on_the_device_from_loader_workers_when_the_shard_is_not_kept(monkeypatch):
    import orchestration.recipe as recipe

    monkeypatch.setattr(recipe, "resident_images", lambda *args, **kwargs: None)  # too large
    cfg = load_experiment(None, [*TINY, "crops.device=gpu"])
    training = build_training(cfg)
    assert isinstance(training.loader, torch.utils.data.DataLoader)
    raw = next(iter(training.loader))
    assert raw.images.dtype == torch.uint8 and tuple(raw.images.shape) == (64, 3, 8, 8)
    stats = training.run_epoch(0)
    assert stats.images == 256 and math.isfinite(stats.loss)
