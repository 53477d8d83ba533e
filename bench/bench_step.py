"""Training-step throughput of the SwAV engine on synthetic crops (no data loading).

Measures what one worker's GPU (or CPU) sustains for the full step: prototype normalisation,
multi-resolution forward, queue, Sinkhorn, loss, backward, optimiser.  The engine is built by the
recipe every run uses (``orchestration.recipe``) from the config defaults plus the flags below
(or any dotted override after them).  Prints one JSON line per repeat and the median.

    python bench/bench_step.py --device cuda --backbone resnet50 --batch-size 64 \
        --crops 2x224,6x96 --prototypes 3000 --queue 3840 --optimizer lars
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestration.config import ExperimentConfig, build_config  # noqa: E402
from orchestration.recipe import build_engine  # noqa: E402


def crop_overrides(text: str) -> list[str]:
    """``2x224,6x96`` -> the crops section (first group global scales, the others local)."""
    groups = [tuple(int(v) for v in part.split("x")) for part in text.split(",")]
    lows = [0.14] + [0.05] * (len(groups) - 1)
    highs = [1.0] + [0.14] * (len(groups) - 1)
    return [f"crops.nmb_crops={[n for n, _ in groups]}",
            f"crops.size_crops={[s for _, s in groups]}",
            f"crops.min_scale_crops={lows}", f"crops.max_scale_crops={highs}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--cifar-stem", action="store_true")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--crops", default="2x224,6x96", help="count x size per resolution group")
    ap.add_argument("--prototypes", type=int, default=3000)
    ap.add_argument("--queue", type=int, default=0, help="queue length (0: none)")
    ap.add_argument("--optimizer", default="lars")
    ap.add_argument("--no-amp", action="store_true")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="further dotted config overrides")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg: ExperimentConfig = build_config({}, [
        f"model.backbone={args.backbone}", f"model.cifar_stem={args.cifar_stem}",
        f"model.n_prototypes={args.prototypes}", f"model.channels_last={args.channels_last}",
        f"optim.name={args.optimizer}", "optim.lr=0.6", "optim.warmup_epochs=0",
        f"optim.batch_size={args.batch_size}", "scaling.num_workers=1",
        f"swav.queue_length={args.queue}", "swav.epoch_queue_starts=0",
        "swav.freeze_prototypes_iters=0", *crop_overrides(args.crops), *args.overrides])
    total = (args.warmup + args.steps) * args.repeats
    engine = build_engine(cfg, total, device, args.batch_size, amp=not args.no_amp)
    engine.start_queue(epoch=0)
    batch = [torch.randn(n * args.batch_size, 3, s, s, device=device)
             for n, s in zip(cfg.crops.nmb_crops, cfg.crops.size_crops)]
    while engine.queue is not None and not engine.queue.full:  # the steady state: a full queue
        engine.step(batch)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    rates = []
    for repeat in range(args.repeats):
        for _ in range(args.warmup):
            engine.step(batch)
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            loss, _ = engine.step(batch)
        sync()
        seconds = time.perf_counter() - start
        rate = args.steps * args.batch_size / seconds
        rates.append(rate)
        print(json.dumps({"repeat": repeat, "images_per_s": round(rate, 1),
                          "ms_per_step": round(1000 * seconds / args.steps, 2),
                          "loss": round(float(loss), 4)}), flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    print(json.dumps({
        "backbone": args.backbone, "device": torch.cuda.get_device_name() if device.type == "cuda"
        else "cpu", "batch_size": args.batch_size, "crops": args.crops, "K": args.prototypes,
        "queue": args.queue, "amp": not args.no_amp, "channels_last": args.channels_last,
        "median_images_per_s": round(statistics.median(rates), 1),
        "peak_mem_gib": round(peak, 2), "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
