"""Training-step throughput of the SwAV engine on synthetic crops (no data loading).

Measures what one worker's GPU (or CPU) sustains for the full step: prototype normalisation,
multi-resolution forward, queue, Sinkhorn, loss, backward, optimiser.  Prints one JSON line per
repeat and the median.

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

from swav.engine import SwAVEngine  # noqa: E402
from swav.loss import SwAVLoss  # noqa: E402
from swav.model import build_model  # noqa: E402
from swav.optim import build_optimizer, build_scheduler  # noqa: E402


def parse_crops(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in part.split("x")) for part in text.split(",")]  # type: ignore


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
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    crops = parse_crops(args.crops)
    n_crops = sum(n for n, _ in crops)
    model = build_model(args.backbone, cifar_stem=args.cifar_stem, hidden_dim=2048, out_dim=128,
                        n_prototypes=args.prototypes).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, args.optimizer, lr=0.6, weight_decay=1e-6)
    total = (args.warmup + args.steps) * args.repeats
    scheduler = build_scheduler(optimizer, total_steps=total, warmup_steps=args.warmup)
    loss_fn = SwAVLoss(n_crops=n_crops, crops_for_assign=[0, 1], epsilon=0.05)
    engine = SwAVEngine(model, loss_fn, optimizer, scheduler, device=device,
                        batch_size=args.batch_size, queue_length=args.queue, epoch_queue_starts=0,
                        amp=not args.no_amp, channels_last=args.channels_last)
    engine._maybe_start_queue(0)
    if engine.queue is not None:  # benchmark the steady state: a full queue
        engine.queue.filled = engine.queue.length
    batch = [torch.randn(n * args.batch_size, 3, s, s, device=device) for n, s in crops]

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
