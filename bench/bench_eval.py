"""Representation quality and counterfactuals: SwAV vs the same encoder at random initialisation.

Trains an experiment single-process with the project's engine (`swav.engine.SwAVEngine`, the loop
Ray workers run), then on the held-out set: kNN and linear top-1 of the trained encoder and of a
randomly initialised one, cluster quality, and counterfactual validity / L1 / L2 / steps for the
`ce` and `logit` methods at their defaults (targets: the nearest other prototype that holds a
held-out image, as `swav-ray explain` picks them). No Ray or MLflow needed (runs on a bare GPU box).

    python bench/bench_eval.py default                                       # CPU, digits
    python bench/bench_eval.py cifar10_resnet18 data.source=parquet \
        data.path=../shared/data/cifar10 optim.epochs=30 --device cuda       # GPU, CIFAR-10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestration.config import load_config, model_kwargs  # noqa: E402
from swav.counterfactual import METHODS, explain, populated_prototypes  # noqa: E402
from swav.data import (  # noqa: E402
    Transformed,
    collate_eval,
    collate_skipping_corrupt,
    eval_transform,
    open_source,
)
from swav.engine import SwAVEngine  # noqa: E402
from swav.evaluation import (  # noqa: E402
    assign_with_scores,
    cluster_quality,
    extract_features,
    knn_accuracy,
    linear_eval,
)
from swav.loss import SwAVLoss  # noqa: E402
from swav.model import build_model  # noqa: E402
from swav.multicrop import MultiCropTransform  # noqa: E402
from swav.optim import build_optimizer, build_scheduler  # noqa: E402


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def train(cfg, splits, device: torch.device, workers: int, max_seconds: float | None):
    c, o, s = cfg.crops, cfg.optim, cfg.swav
    crops = MultiCropTransform(c.nmb_crops, c.size_crops, c.min_scale_crops, c.max_scale_crops,
                               mean=c.mean, std=c.std, color_strength=c.color_strength,
                               blur_prob=c.blur_prob, flip_prob=c.flip_prob)
    batch = o.batch_size * cfg.scaling.num_workers  # the experiment's global batch, one process
    loader = DataLoader(Transformed(splits.train, crops), batch_size=batch, shuffle=True,
                        drop_last=True, collate_fn=collate_skipping_corrupt, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    torch.manual_seed(cfg.scaling.seed)
    model = build_model(**model_kwargs(cfg.model))
    channels_last = cfg.model.channels_last and device.type == "cuda"
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, o.name, o.lr, o.weight_decay, o.momentum)
    steps = len(loader)
    scheduler = build_scheduler(optimizer, o.epochs * steps, round(o.warmup_epochs * steps),
                                o.final_lr / o.lr, o.start_warmup / o.lr)
    loss_fn = SwAVLoss(sum(c.nmb_crops), c.crops_for_assign, s.temperature, s.epsilon,
                       s.sinkhorn_iterations)
    engine = SwAVEngine(model, loss_fn, optimizer, scheduler, device=device, batch_size=batch,
                        queue_length=s.queue_length, epoch_queue_starts=s.epoch_queue_starts,
                        freeze_prototypes_iters=s.freeze_prototypes_iters,
                        channels_last=channels_last)
    start = time.perf_counter()
    for epoch in range(o.epochs):
        stats = engine.train_epoch(loader, epoch)
        emit({"epoch": epoch, "loss": round(stats.loss, 4), "images_per_s": round(stats.images_per_s),
              "used_prototypes": stats.used_prototypes})
        if max_seconds and time.perf_counter() - start > max_seconds and epoch + 1 < o.epochs:
            emit({"stopped_early_after_epochs": epoch + 1})  # a guard for time-boxed machines
            break
    return model.eval()


def representation(model, train_loader, held_loader, cfg, n_classes, device, linear) -> dict:
    f_tr, y_tr = extract_features(model.backbone, train_loader, device)
    f_he, y_he = extract_features(model.backbone, held_loader, device)
    return {**knn_accuracy(f_tr, y_tr, f_he, y_he, cfg.eval.knn_k, cfg.eval.knn_temperature,
                           n_classes),
            **linear_eval(f_tr.to(device), y_tr.to(device), f_he.to(device), y_he.to(device),
                          method=linear, n_classes=n_classes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--loader-workers", type=int, default=None)
    ap.add_argument("--linear", default="auto", help="auto | sklearn | sgd")
    ap.add_argument("--cf-images", type=int, default=256)
    ap.add_argument("--max-train-seconds", type=float, default=None)
    ap.add_argument("--save-model", default=None, help="write the trained state_dict here")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = load_config(args.config, args.overrides)
    d = cfg.data
    splits = open_source(d.source, d.path, d.download, d.image_column, d.label_column,
                         d.holdout_fraction, cfg.scaling.seed, d.limit)
    workers = d.loader_workers if args.loader_workers is None else args.loader_workers
    start = time.perf_counter()
    model = train(cfg, splits, device, workers, args.max_train_seconds)
    train_s = time.perf_counter() - start
    if args.save_model:
        torch.save(model.state_dict(), args.save_model)

    plain = eval_transform(d.eval_size or cfg.crops.size_crops[0], cfg.crops.mean, cfg.crops.std)
    bank = Transformed(splits.train, plain)
    if cfg.eval.max_train_images and len(bank) > cfg.eval.max_train_images:
        bank = Subset(bank, range(cfg.eval.max_train_images))
    held = Transformed(splits.heldout, plain)
    kw = dict(batch_size=512, collate_fn=collate_eval, num_workers=workers)
    bank_loader, held_loader = DataLoader(bank, **kw), DataLoader(held, **kw)
    trained = representation(model, bank_loader, held_loader, cfg, splits.n_classes, device,
                             args.linear)
    torch.manual_seed(cfg.scaling.seed)
    random_model = build_model(**model_kwargs(cfg.model)).to(device).eval()
    baseline = representation(random_model, bank_loader, held_loader, cfg, splits.n_classes,
                              device, args.linear)
    assignments, _, labels = assign_with_scores(model, held_loader, device)
    quality = cluster_quality(assignments, labels, model.prototypes.sizes[0])

    images = torch.stack([held[i][0] for i in range(min(args.cf_images, len(held)))]).to(device)
    populated = populated_prototypes(assignments, model.prototypes.sizes[0]).to(device)
    cf = {}
    for method in METHODS:
        t0 = time.perf_counter()
        result = explain(model, images, method=method, mean=cfg.crops.mean, std=cfg.crops.std,
                         temperature=cfg.swav.temperature, candidates=populated)
        cf[method] = {**{k: round(float(v), 4) for k, v in result.summary().items()},
                      "seconds": round(time.perf_counter() - t0, 1)}
    emit({"config": args.config, "overrides": args.overrides, "device": str(device),
          "train_s": round(train_s, 1), "swav": trained, "random_init": baseline,
          "cluster_quality": quality, "counterfactuals": cf, "cf_images": len(images),
          "torch": torch.__version__})


if __name__ == "__main__":
    main()
