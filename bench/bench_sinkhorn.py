"""Sinkhorn-Knopp cost: the log-domain implementation vs the literal exp-domain algorithm.

    python bench/bench_sinkhorn.py --device cuda --sizes 256x3000,4096x3000,4096x65536
Prints median milliseconds of several repeats for each size and whether each result is finite at
epsilon 0.05 and 0.01 (the exp-domain algorithm overflows float32 at 0.01).  ``--stack N``: the
codes of N matrices (SwAV's assigned crops), one call each against one call on the stack
``[N, B, K]`` (``log_domain_stacked``), as ``swav.loss`` makes it.
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

from swav.sinkhorn import sinkhorn  # noqa: E402


@torch.no_grad()
def exp_domain(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """The paper's Algorithm (Appendix A.1) as written, single process, float32."""
    q = torch.exp(scores.float() / epsilon).t()
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


def timed(fn, scores, epsilon, device, repeats, inner=10) -> tuple[float, bool]:
    out = fn(scores, epsilon)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(scores, epsilon)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000 / inner)
    return statistics.median(times), bool(torch.isfinite(out).all())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="256x3000,4096x3000")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stack", type=int, default=1, help="matrices per call (assigned crops)")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    for size in args.sizes.split(","):
        b, k = (int(v) for v in size.split("x"))
        z = torch.nn.functional.normalize(torch.randn(b, 128, device=device), dim=1)
        c = torch.nn.functional.normalize(torch.randn(k, 128, device=device), dim=1)
        scores = torch.stack([(z.roll(i, 0) @ c.t()).bfloat16() for i in range(args.stack)])
        row = {"B": b, "K": k, "stack": args.stack, "device": args.device}
        rows = {"log_domain": lambda s, e: torch.stack([sinkhorn(m, e, 3) for m in s]),
                "exp_domain": lambda s, e: torch.stack([exp_domain(m, e) for m in s])}
        if args.stack > 1:
            rows["log_domain_stacked"] = lambda s, e: sinkhorn(s, e, 3)
        for name, fn in rows.items():
            ms, finite = timed(fn, scores, 0.05, device, args.repeats)
            _, finite_001 = timed(fn, scores, 0.01, device, 1, inner=1)
            row[name] = {"median_ms": round(ms, 3), "finite_eps_0.05": finite,
                         "finite_eps_0.01": finite_001}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
