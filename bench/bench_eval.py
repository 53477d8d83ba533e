"""Representation quality and counterfactuals: SwAV vs the same encoder at random initialisation.

Trains an experiment single-process with the project's engine (`swav.engine.SwAVEngine`, the loop
Ray workers run), then on the held-out set: kNN and linear top-1 of the trained encoder and of a
randomly initialised one, cluster quality, and counterfactual validity / L1 / L2 / steps for the
`ce` and `logit` methods at their defaults, for each target mode of `swav-ray explain`
(`--cf-targets`: `nearest`, the nearest other prototype that holds a held-out image;
`other_label`, the nearest such prototype whose majority label differs from the image's cluster's)
and each edit domain (`--cf-gray`: `auto`, luminance-only edits for grayscale images as `explain`
makes them; `off`, free per-channel edits). No Ray or MLflow needed (runs on a bare GPU box).
`--save-model` / `--load-model` keep a trained model to evaluate again without training.

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestration.preflight import load_experiment  # noqa: E402
from orchestration.recipe import (  # noqa: E402
    build_training,
    eval_loaders,
    eval_sets,
    initial_model,
    open_splits,
)
from swav.counterfactual import (  # noqa: E402
    METHODS,
    explain,
    other_label_candidates,
    populated_prototypes,
    prototype_scores,
)
from swav.evaluation import (  # noqa: E402
    assign_with_scores,
    cluster_quality,
    extract_features,
    knn_accuracy,
    linear_eval,
    majority_labels,
)


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def train(cfg, device: torch.device, max_seconds: float | None):
    """The experiment's global batch in one process, through the recipe every runner uses."""
    training = build_training(cfg, device=device)
    start = time.perf_counter()
    for epoch in range(cfg.optim.epochs):
        stats = training.run_epoch(epoch)
        emit({"epoch": epoch, "loss": round(stats.loss, 4), "images_per_s": round(stats.images_per_s),
              "prototypes_used": stats.prototypes_used})
        if max_seconds and time.perf_counter() - start > max_seconds and epoch + 1 < cfg.optim.epochs:
            emit({"stopped_early_after_epochs": epoch + 1})  # a guard for time-boxed machines
            break
    return training.engine.net.eval()


def representation(model, train_loader, held_loader, cfg, n_classes, device, linear) -> dict:
    f_tr, y_tr = extract_features(model.backbone, train_loader, device)
    f_he, y_he = extract_features(model.backbone, held_loader, device)
    return {**knn_accuracy(f_tr, y_tr, f_he, y_he, cfg.eval.knn_k, cfg.eval.knn_temperature,
                           n_classes),
            **linear_eval(f_tr.to(device), y_tr.to(device), f_he.to(device), y_he.to(device),
                          method=linear, n_classes=n_classes)}


def counterfactuals(model, images, assignments, labels, cfg, modes, grays) -> dict:
    """Validity / L1 / L2 / steps of each method for each target mode and edit domain."""
    k = model.prototypes.sizes[0]
    populated = populated_prototypes(assignments, k).to(images.device)
    with torch.no_grad():
        source = prototype_scores(model, images).argmax(dim=1)
    candidates = {"nearest": populated}
    if labels is not None:
        majority, _ = majority_labels(assignments, labels, k)
        candidates["other_label"] = other_label_candidates(source, majority, populated)
    out = {}
    for mode in modes:
        for gray in grays:
            for method in METHODS:
                t0 = time.perf_counter()
                result = explain(model, images, method=method, mean=cfg.crops.mean,
                                 std=cfg.crops.std, temperature=cfg.swav.temperature,
                                 candidates=candidates[mode],
                                 grayscale=None if gray == "auto" else False)
                out[f"{mode}/{gray}/{method}"] = {
                    **{key: round(float(v), 4) for key, v in result.summary().items()},
                    "seconds": round(time.perf_counter() - t0, 1)}
    return out


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
    ap.add_argument("--load-model", default=None, help="evaluate this state_dict, no training")
    ap.add_argument("--cf-targets", default="nearest", help="comma-separated: nearest,other_label")
    ap.add_argument("--cf-gray", default="auto", help="comma-separated: auto,off")
    args = ap.parse_args()
    device = torch.device(args.device)
    overrides = list(args.overrides)
    if args.loader_workers is not None:
        overrides.append(f"data.loader_workers={args.loader_workers}")
    cfg = load_experiment(args.config, overrides)
    start = time.perf_counter()
    if args.load_model:
        model = initial_model(cfg).to(device)
        model.load_state_dict(torch.load(args.load_model, map_location=device, weights_only=True))
        model.eval()
    else:
        model = train(cfg, device, args.max_train_seconds)
    train_s = time.perf_counter() - start
    if args.save_model:
        torch.save(model.state_dict(), args.save_model)

    sets = eval_sets(cfg, open_splits(cfg))
    held, n_classes = sets.heldout, sets.n_classes
    bank_loader, held_loader = eval_loaders(cfg, sets)
    trained = representation(model, bank_loader, held_loader, cfg, n_classes, device, args.linear)
    random_model = initial_model(cfg).to(device).eval()
    baseline = representation(random_model, bank_loader, held_loader, cfg, n_classes, device,
                              args.linear)
    assignments, _, labels = assign_with_scores(model, held_loader, device)
    quality = cluster_quality(assignments, labels, model.prototypes.sizes[0])

    images = torch.stack([held[i][0] for i in range(min(args.cf_images, len(held)))]).to(device)
    cf = counterfactuals(model, images, assignments, labels, cfg, args.cf_targets.split(","),
                         args.cf_gray.split(","))
    emit({"config": args.config, "overrides": args.overrides, "device": str(device),
          "train_s": round(train_s, 1), "swav": trained, "random_init": baseline,
          "cluster_quality": quality, "counterfactuals": cf, "cf_images": len(images),
          "torch": torch.__version__})


if __name__ == "__main__":
    main()
