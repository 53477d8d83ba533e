"""Time to accuracy on CIFAR-10: kNN top-1 at fixed marks of wall-clock training time.

Our recipe (an experiment file, trained by the one epoch loop through ``orchestration.recipe``,
crops on the GPU) and lightly's published CIFAR-10 SwaV recipe (``bench/lightly_peer.py``; needs
the ``bench`` extra) train on the same Parquet images, on the same GPU, in the same call, each for
``--budget`` seconds of wall-clock training (data loading included; evaluations pause the clock).
Ours trains for the budget as ``swav-ray train`` does with ``optim.time_budget_s`` (whole epochs
planned from the pace, its schedule fitted to them); lightly's cosine runs over its published 200
epochs (``--lightly-anneal``: over the budget instead).
``--variants`` names variants of ours (overrides on top of it) that ``--recipes`` can list: the
runs that choose a recipe share one decode of the data and one call.

kNN (weighted cosine, k=200, T=0.1 as lightly's benchmarks) uses all training images as the bank
and the test split as queries, each recipe's own normalisation, no augmentation; the same encoders
at random initialisation give the baseline.  One JSON line per mark and recipe.

    python bench/bench_time_to_accuracy.py --data ../shared/data/cifar10 --budget 120 \
        --marks 60,120 --recipes ours,lightly
    python bench/bench_time_to_accuracy.py --data ../shared/data/cifar10 --budget 120 \
        --marks 120 --recipes ours,k1000 --variants "k1000:model.n_prototypes=1000"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestration.preflight import load_experiment  # noqa: E402
from orchestration.recipe import (  # noqa: E402
    build_training, initial_model, model_kwargs, open_splits, use_cudnn_benchmark)
from orchestration.time_budget import TrainingClock, plan_run  # noqa: E402
from swav.counterfactual import METHODS, explain, populated_prototypes, prototype_scores  # noqa: E402,E501
from swav.evaluation import knn_accuracy  # noqa: E402
from swav.raw_batches import resident_images  # noqa: E402
from variants import parse_variants  # noqa: E402

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # lightly's normalisation


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


class Evaluator:
    """kNN top-1 of an encoder: bank = training images, queries = the test split (on the GPU)."""

    def __init__(self, train: torch.Tensor, y_train: torch.Tensor, test: torch.Tensor,
                 y_test: torch.Tensor, device: torch.device, k: int, t: float) -> None:
        self.sets = [(train.to(device), y_train), (test.to(device), y_test)]
        self.device, self.k, self.t = device, k, t
        self.baselines: dict[str, float] = {}  # random-init kNN by encoder config

    @torch.no_grad()
    def features(self, encoder, images: torch.Tensor, mean, std) -> torch.Tensor:
        m = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        s = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        out = []
        for chunk in images.split(1024):
            x = ((chunk.float() / 255 - m) / s).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                out.append(F.normalize(encoder(x).float(), dim=1))
        return torch.cat(out)

    def knn(self, encoder, mean, std) -> float:
        was = encoder.training
        encoder.eval()
        (xtr, ytr), (xte, yte) = self.sets
        with torch.compiler.set_stance("force_eager"):  # as the worker's kNN (model.compile)
            result = knn_accuracy(self.features(encoder, xtr, mean, std), ytr.to(self.device),
                                  self.features(encoder, xte, mean, std), yte.to(self.device),
                                  self.k, self.t, 10)
        encoder.train(was)
        return round(float(result["knn_top1"]), 4)


@torch.no_grad()
def _normalised(images: torch.Tensor, mean, std, device) -> torch.Tensor:
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (images.to(device).float() / 255 - m) / s


def counterfactuals(model, cfg, test_u8: torch.Tensor, n: int, device) -> dict:
    """``explain``'s default targets on the first ``n`` test images, each method: the nearest
    other prototype among those populated by the test split (as ``swav-ray explain`` picks)."""
    model.eval()
    with torch.no_grad():
        assigned = torch.cat([prototype_scores(model, _normalised(c, cfg.crops.mean,
                                                                  cfg.crops.std, device)).argmax(1)
                              for c in test_u8.split(1024)])
    populated = populated_prototypes(assigned, model.prototypes.sizes[0]).to(device)
    images = _normalised(test_u8[:n], cfg.crops.mean, cfg.crops.std, device)
    out = {"populated": int(populated.sum())}
    for method in METHODS:
        t0 = time.perf_counter()
        result = explain(model, images, method=method, mean=cfg.crops.mean, std=cfg.crops.std,
                         temperature=cfg.swav.temperature, candidates=populated)
        out[method] = {**{k: round(float(v), 4) for k, v in result.summary().items()},
                       "seconds": round(time.perf_counter() - t0, 1)}
    model.train()
    return out


def train_ours(cfg, budget: float, marks: list[float], evaluate, device,
               name: str = "ours") -> dict:
    """The experiment through the one epoch loop for ``budget`` seconds of training, planned as
    ``swav-ray train`` plans ``optim.time_budget_s`` (:mod:`orchestration.time_budget`: whole
    epochs, the schedule fitted to them). A mark is read at the first epoch's end past it; the
    marks not reached by the run's end (within half an epoch of the budget) are read there."""
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, time_budget_s=budget))
    setup = time.perf_counter()
    training = build_training(cfg, device=device)
    engine, steps = training.engine, training.steps_per_epoch
    emit({"recipe": name, "setup_s": round(time.perf_counter() - setup, 1),
          "steps_per_epoch": steps, "loader": type(training.loader).__name__})
    clock = TrainingClock()
    planned, _ = plan_run(cfg.optim, engine, clock, 0, steps)
    plans = [planned]  # the plan before each epoch and at the end (how the schedule moved)
    pending, epoch, images = sorted(marks), 0, 0
    while epoch < planned:
        started = time.perf_counter()
        stats = training.run_epoch(epoch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started  # GPU work included
        clock.add_epoch(seconds, device)
        images += stats.images
        epoch += 1
        planned, _ = plan_run(cfg.optim, engine, clock, epoch, steps)
        plans.append(planned)
        while pending and (clock.trained_s >= pending[0] or epoch == planned):
            emit({"recipe": name, "mark_s": pending.pop(0), "trained_s": round(clock.trained_s, 1),
                  "epochs": epoch, "epochs_planned": planned, "loss": round(stats.loss, 4),
                  "images_per_s": round(images / clock.trained_s),
                  "last_epoch_images_per_s": round(stats.images / seconds),  # the steady state
                  "knn_top1": evaluate(engine.net.backbone)})
    return {"epochs": epoch, "images_per_s": round(images / clock.trained_s),
            "first_epoch_s": round(clock.first_s, 1),  # start-up: compiling, autotuning
            "plans": plans, "model": engine.net}


def run_ours(name: str, cfg, args, ev: Evaluator, test_u8: torch.Tensor, marks: list[float],
             device: torch.device) -> dict:
    """Our recipe (or a named variant of it): random-init kNN, the timed training with its
    marks, then counterfactuals of the final model."""
    norm = (cfg.crops.mean, cfg.crops.std)
    # Variants that leave the encoder and its input alone share one random-init figure (the
    # architecture: model.compile or channels_last do not change it).
    key = repr((sorted(model_kwargs(cfg).items()), cfg.scaling.seed, norm))
    if key not in ev.baselines:
        ev.baselines[key] = ev.knn(initial_model(cfg).backbone.to(device), *norm)
    emit({"recipe": name, "mark_s": 0, "random_init_knn_top1": ev.baselines[key]})
    summary = train_ours(cfg, args.budget, marks, lambda enc: ev.knn(enc, *norm), device, name)
    model = summary.pop("model")
    if args.cf_images:
        with torch.compiler.set_stance("force_eager"):  # as explain's rebuilt model runs
            found = counterfactuals(model, cfg, test_u8, args.cf_images, device)
        emit({"recipe": name, "counterfactuals": found, "cf_images": args.cf_images})
    return summary


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="folder with train.parquet and test.parquet")
    ap.add_argument("--config", default="experiments/cifar10_wallclock.yaml")
    ap.add_argument("--budget", type=float, default=120.0)
    ap.add_argument("--marks", default="60,120")
    ap.add_argument("--recipes", default="ours,lightly")
    ap.add_argument("--workers", type=int, default=15, help="loader processes (decode; lightly)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--lightly-anneal", action="store_true", help="lightly's cosine over budget")
    ap.add_argument("--eval-limit", type=int, default=None, help="smoke tests: fewer kNN images")
    ap.add_argument("--cf-images", type=int, default=256,
                    help="counterfactuals of our final model on this many test images (0: none)")
    ap.add_argument("--knn-k", type=int, default=200)
    ap.add_argument("--knn-t", type=float, default=0.1)
    ap.add_argument("--variants", default="",
                    help="named variants of ours for --recipes, each its overrides on top of the "
                         "others: 'k1000:model.n_prototypes=1000;b1024:optim.batch_size=1024,"
                         "optim.lr=4.8'")
    ap.add_argument("overrides", nargs="*", help="dotted overrides of our experiment")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    variants = parse_variants(args.variants, ("ours", "lightly"))
    unknown = set(args.recipes.split(",")) - {"ours", "lightly", *variants}
    if unknown:
        raise SystemExit(f"--recipes: {sorted(unknown)} are neither ours, lightly nor a variant")
    device = torch.device(args.device)
    marks = [float(m) for m in args.marks.split(",")]
    base = [f"data.path={args.data}", "data.source=parquet",
            f"data.loader_workers={args.workers}", *args.overrides]
    cfg = load_experiment(args.config, base)
    # Every variant's config is checked now, before any GPU time is spent (the data is base's).
    configs = {name: load_experiment(args.config, [*base, *extra])
               for name, extra in variants.items()}
    splits = open_splits(cfg)
    t0 = time.perf_counter()
    train_u8, _ = resident_images(splits.train, args.workers)
    test_u8, _ = resident_images(splits.heldout, args.workers)
    y_train = torch.tensor(splits.train.labels())
    y_test = torch.tensor(splits.heldout.labels())
    emit({"decoded": [len(train_u8), len(test_u8)], "seconds": round(time.perf_counter() - t0, 1),
          "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
          "torch": torch.__version__})
    n = args.eval_limit
    ev = Evaluator(train_u8[:n], y_train[:n], test_u8[:n], y_test[:n], device, args.knn_k,
                   args.knn_t)
    for recipe in args.recipes.split(","):
        if recipe == "ours" or recipe in variants:
            summary = run_ours(recipe, configs.get(recipe, cfg), args, ev, test_u8, marks, device)
        else:
            from lightly_peer import LIGHTLY_RESNET18, LightlySwaV, published_cifar10

            # Under ours' cudnn.benchmark, whichever ran before (lightly's recipe runs under a
            # Lightning Trainer, which leaves it off by default: the peer gains, if anything).
            use_cudnn_benchmark(cfg, device)
            torch.manual_seed(cfg.scaling.seed)
            emit({"recipe": "lightly", "mark_s": 0, "random_init_knn_top1":
                  ev.knn(LightlySwaV(LIGHTLY_RESNET18).backbone.to(device),
                                                  *IMAGENET)})
            rows = {"images": 0}

            def on_mark(mark: float, backbone) -> None:
                emit({"recipe": "lightly", "mark_s": mark, "knn_top1": ev.knn(backbone, *IMAGENET)})

            published_cifar10(train_u8, args.budget, device, workers=args.workers, marks=marks,
                              on_mark=on_mark, seed=cfg.scaling.seed, stats=rows,
                              schedule_epochs=None if args.lightly_anneal else 200)
            summary = rows
        summary["cudnn_benchmark"] = torch.backends.cudnn.benchmark
        emit({"recipe": recipe, "summary": summary})


if __name__ == "__main__":
    main()
