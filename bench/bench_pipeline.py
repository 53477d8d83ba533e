"""Data-pipeline throughput: multi-crop images/s of the PIL path (loader processes) and of the
batched path (``swav.batch_multicrop`` on the GPU, eager and compiled with ``crops.compile``, and
on the CPU for reference), and with ``--kornia`` of the same multi-crop built from Kornia's batched
augmentations (``bench/kornia_peer.py``).

The images are the training split of an experiment (decoded once to uint8 for the batched path,
as the run keeps them); the crops are the experiment's.  The PIL path is timed through a
``DataLoader`` with ``--workers`` processes, the way a run feeds its step (decode + multi-crop +
collate); the batched path from a device-resident uint8 tensor (index, crop, augment, normalise).
Each figure is the median of ``--repeats`` timed passes of ``--batches`` batches.

    python bench/bench_pipeline.py cifar10_resnet18 data.source=parquet \
        data.path=../shared/data/cifar10 --workers 1,15 --kornia resample,slice
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestration.preflight import load_experiment  # noqa: E402
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
    ap.add_argument("--kornia", default="", metavar="MODES",
                    help="also Kornia's batched multi-crop (bench/kornia_peer.py; needs kornia), "
                         "one row per RandomResizedCrop cropping mode: resample, slice")
    args = ap.parse_args()
    _check_kornia(args.kornia)
    cfg = load_experiment(args.config, [*args.overrides, "scaling.num_workers=1"])
    batch, splits = cfg.optim.batch_size, open_splits(cfg)
    common = {"config": args.config, "crops": list(zip(cfg.crops.nmb_crops, cfg.crops.size_crops)),
              "batch": batch, "torch": torch.__version__}
    for workers in (int(w) for w in args.workers.split(",")):
        cpu_cfg = load_experiment(args.config, [*args.overrides, "scaling.num_workers=1",
                                            "crops.device=cpu", f"data.loader_workers={workers}"])
        loader = train_loader(cpu_cfg, splits, 0, 1, torch.device("cpu"))
        rates = [args.batches * batch / timed(loader, args.batches, lambda: None)
                 for _ in range(args.repeats)]
        rate = statistics.median(rates)
        emit({**common, "path": "pil", "workers": workers, "images_per_s": round(rate),
              "images_per_s_per_core": round(rate / max(workers, 1))})
    images, _ = resident_images(splits.train, max(int(args.workers.split(",")[-1]), 0))
    devices = [torch.device(args.device)] + ([torch.device("cpu")] if args.device != "cpu" else [])
    rows = [(device, name) for device in devices for name in _batched_rows(device, args)]
    kept = {device: images.to(device) for device in devices}  # one copy per device, not per row
    streams = {}
    for device, name in rows:
        resident = ResidentBatches(kept[device], batch, device)
        streams[device, name] = _crops(_batched_augment(args, name, device), resident)
        next(streams[device, name])  # compiled on first use: not timed
    rates: dict[tuple, list[float]] = {row: [] for row in rows}
    for _ in range(args.repeats):  # the rows alternate within each repeat
        for device, name in rows:
            n = args.device_batches if device.type == "cuda" else max(2, args.batches // 2)
            rates[device, name].append(n * batch / timed(streams[device, name], n, _sync(device)))
    for (device, name), measured in rates.items():
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
            f"cpu ({torch.get_num_threads()} threads)")
        emit({**common, "path": "batched", "device": where, "row": name,
              "compiled": name == "compiled", "images_per_s": round(statistics.median(measured))})


def _batched_rows(device: torch.device, args) -> list[str]:
    """``eager`` (ours), ``compiled`` (ours with ``crops.compile``, on a GPU) and one
    ``kornia-<mode>`` row per ``--kornia`` cropping mode."""
    rows = ["eager"]
    if device.type == "cuda" and not args.no_compiled:
        rows.append("compiled")
    return rows + [f"kornia-{mode}" for mode in args.kornia.split(",") if mode]


def _check_kornia(modes: str) -> None:
    """``--kornia``: known cropping modes, and Kornia installed (it is no dependency)."""
    from kornia_peer import CROP_MODES

    unknown = [m for m in modes.split(",") if m and m not in CROP_MODES]
    if unknown:
        sys.exit(f"--kornia: unknown cropping mode {unknown[0]!r} "
                 f"(expected {', '.join(CROP_MODES)})")
    if modes and importlib.util.find_spec("kornia") is None:
        sys.exit("--kornia: Kornia is not installed (pip install 'swav-ray[bench]')")


def _batched_augment(args, name: str, device: torch.device):
    cfg = load_experiment(args.config, [*args.overrides, "scaling.num_workers=1",
                                    f"crops.compile={name == 'compiled'}"])
    if name.startswith("kornia-"):
        from kornia_peer import kornia_multicrop
        return kornia_multicrop(cfg.crops, cropping_mode=name.removeprefix("kornia-"))
    return batch_crop_transform(cfg, device)


def _crops(augment, resident: ResidentBatches):
    """``augment``'s crops of ``resident``'s batches, epoch after epoch (a repeat may run past one
    epoch).  A function, not a generator expression in the loop above: that would look up
    ``augment`` when drawn, and every row would time the last row's augmentation."""
    while True:
        for raw in resident:
            yield augment(raw.images)


def _sync(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


if __name__ == "__main__":
    main()
