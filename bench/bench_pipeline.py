"""Data-pipeline throughput: multi-crop images/s of the PIL path (loader processes) and of the
batched path (``swav.batch_multicrop`` on the GPU, eager and compiled with ``crops.compile``, and
on the CPU for reference).

The images are the training split of an experiment (decoded once to uint8 for the batched path,
as the run keeps them); the crops are the experiment's.  The PIL path is timed through a
``DataLoader`` with ``--workers`` processes, the way a run feeds its step (decode + multi-crop +
collate); the batched path from a device-resident uint8 tensor (index, crop, augment, normalise).
Each figure is the median of ``--repeats`` timed passes of ``--batches`` batches.

    python bench/bench_pipeline.py cifar10_resnet18 data.source=parquet \
        data.path=../shared/data/cifar10 --workers 1,15
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestration.config import load_config  # noqa: E402
from orchestration.recipe import batch_crop_transform, open_splits, train_loader  # noqa: E402
from swav.raw_batches import ResidentBatches, resident_images  # noqa: E402


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def timed(batches, n: int, sync) -> float:
    """Seconds to draw ``n`` batches (after one untimed batch: workers started, caches warm)."""
    it = iter(batches)
    next(it)
    sync()
    start = time.perf_counter()
    for _ in range(n):
        next(it)
    sync()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--workers", default=f"1,{os.cpu_count()}", help="PIL loader processes")
    ap.add_argument("--batches", type=int, default=10, help="timed batches of the PIL path")
    ap.add_argument("--device-batches", type=int, default=50, help="timed batches, batched path")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compiled", action="store_true", help="on a GPU, the eager path only")
    args = ap.parse_args()
    cfg = load_config(args.config, [*args.overrides, "scaling.num_workers=1"])
    batch, splits = cfg.optim.batch_size, open_splits(cfg)
    common = {"config": args.config, "crops": list(zip(cfg.crops.nmb_crops, cfg.crops.size_crops)),
              "batch": batch, "torch": torch.__version__}
    for workers in (int(w) for w in args.workers.split(",")):
        cpu_cfg = load_config(args.config, [*args.overrides, "scaling.num_workers=1",
                                            "crops.device=cpu", f"data.loader_workers={workers}"])
        loader = train_loader(cpu_cfg, splits, 0, 1, torch.device("cpu"))
        rates = [args.batches * batch / timed(loader, args.batches, lambda: None)
                 for _ in range(args.repeats)]
        rate = statistics.median(rates)
        emit({**common, "path": "pil", "workers": workers, "images_per_s": round(rate),
              "images_per_s_per_core": round(rate / max(workers, 1))})
    images, _ = resident_images(splits.train, max(int(args.workers.split(",")[-1]), 0))
    devices = [torch.device(args.device)] + ([torch.device("cpu")] if args.device != "cpu" else [])
    # On a GPU the batched path runs eager and compiled (crops.compile), alternating per repeat.
    variants = [(device, fused) for device in devices
                for fused in ((False, True) if device.type == "cuda" and not args.no_compiled
                              else (False,))]
    rates: dict[tuple, list[float]] = {v: [] for v in variants}
    streams = {}
    for device, fused in variants:
        fused_cfg = load_config(args.config, [*args.overrides, "scaling.num_workers=1",
                                              f"crops.compile={fused}"])
        augment = batch_crop_transform(fused_cfg, device)
        resident = ResidentBatches(images, batch, device)
        streams[device, fused] = (augment(raw.images) for raw in _forever(resident))
        next(streams[device, fused])  # compiled on first use: not timed
    for _ in range(args.repeats):
        for device, fused in variants:
            n = args.device_batches if device.type == "cuda" else max(2, args.batches // 2)
            rates[device, fused].append(n * batch / timed(streams[device, fused], n, _sync(device)))
    for (device, fused), measured in rates.items():
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
            f"cpu ({torch.get_num_threads()} threads)")
        emit({**common, "path": "batched", "device": name, "compiled": fused,
              "images_per_s": round(statistics.median(measured))})


def _forever(resident: ResidentBatches):
    """Batches of ``resident``, epoch after epoch (a repeat may run past one epoch)."""
    while True:
        yield from resident


def _sync(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


if __name__ == "__main__":
    main()
