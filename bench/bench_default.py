"""The embedded default experiment, end to end, over several seeds: does it learn?

Runs `experiments/default.yaml` (2 Ray workers on a local Ray instance, MLflow in a temporary
sqlite store) once per seed and prints held-out kNN top-1 of the trained encoder against the same
encoder at initialisation, the loss, prototype usage and wall time; then the medians.

    python bench/bench_default.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from orchestration.preflight import load_experiment  # noqa: E402
from orchestration.train import run_training  # noqa: E402


def last(client: MlflowClient, run_id: str, key: str) -> float:
    """The per-epoch figure of the last epoch: the highest step, first logged (the final
    evaluation logs kNN figures of its own, on the whole held-out set, at step 0 afterwards)."""
    history = client.get_metric_history(run_id, key)
    return max(history, key=lambda m: (m.step, -m.timestamp)).value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="default")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    ray.init(address="local", num_cpus=3, num_gpus=0, include_dashboard=True, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            cfg = load_experiment(args.config, [*args.overrides, f"scaling.seed={seed}",
                                                f"scaling.storage_path={tmp}/runs",
                                                f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db"])
            start = time.perf_counter()
            outcome = run_training(cfg, run_name=f"bench-seed{seed}")
            seconds = time.perf_counter() - start
            client = MlflowClient(outcome.tracking_uri)
            loss = client.get_metric_history(outcome.run_id, "loss")
            row = {
                "seed": seed,
                "knn_top1": round(last(client, outcome.run_id, "knn_top1"), 4),
                "knn_top1_random_init": round(last(client, outcome.run_id, "knn_top1_random_init"), 4),
                "loss_first": round(loss[0].value, 3), "loss_last": round(loss[-1].value, 3),
                "prototypes_used": int(last(client, outcome.run_id, "prototypes_used")),
                "wall_s": round(seconds, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    ray.shutdown()
    print(json.dumps({"median_" + k: statistics.median(r[k] for r in rows)
                      for k in ("knn_top1", "knn_top1_random_init", "loss_last", "wall_s")}))


if __name__ == "__main__":
    main()
