"""``swav-ray``: the command line.

    swav-ray train [CONFIG] [section.key=value ...]
    swav-ray evaluate --run-id ID
    swav-ray explain --run-id ID [--n N] [--method ce|logit] [--target K]

CONFIG is a YAML file or the name of one in ``experiments/`` (default: ``experiments/default.yaml``,
the embedded digits run).  The configuration is validated before Ray starts.  With
``RAY_ADDRESS`` set (as under ``ray job submit``) the command joins that cluster; otherwise it
starts a local Ray instance sized for the run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from orchestration.config import ConfigError, ExperimentConfig, load_config

__all__ = ["connect_ray", "main"]


def connect_ray(cfg: ExperimentConfig) -> bool:
    """Join the cluster named by RAY_ADDRESS, or start a local one. True when this call did."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return True
    sc = cfg.scaling
    needed = sc.num_workers * sc.cpus_per_worker
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
             num_gpus=None if sc.use_gpu else 0, include_dashboard=True, log_to_driver=True)
    return True


def _print_summary(outcome) -> None:
    from swav.counterfactual import METHODS

    uri = outcome.tracking_uri
    m = outcome.metrics
    shown = {k: m[k] for k in ("epoch", "loss", "knn_top1", "used_prototypes") if k in m}
    print(f"\nrun {outcome.run_name} finished: {shown}")
    if "linear_top1" in m:
        print(f"evaluation (held-out): kNN top-1 {m['knn_top1']:.3f} (random init "
              f"{m['knn_top1_random_init']:.3f}), linear top-1 {m['linear_top1']:.3f} (random "
              f"init {m['linear_top1_random_init']:.3f}), NMI {m['nmi']:.3f}, ARI {m['ari']:.3f}")
    for method in METHODS:
        if f"{method}_cf_validity" in m:
            print(f"counterfactuals ({method}): validity {m[f'{method}_cf_validity']:.3f}, "
                  f"mean L2 {m[f'{method}_cf_l2']:.3f}, mean steps {m[f'{method}_cf_steps']:.1f}")
    print(f"MLflow run id: {outcome.run_id}")
    print(f"checkpoint: {outcome.checkpoint_path}")
    print(f"view it: mlflow ui --backend-store-uri {uri}" if not uri.startswith("http")
          else f"view it: {uri}")


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # fails here, before Ray, on bad input
    from orchestration.tracking import check_reachable, resolve_tracking_uri

    check_reachable(resolve_tracking_uri(cfg.tracking.tracking_uri))
    import ray

    from orchestration.train import run_training

    connected = connect_ray(cfg)
    try:
        outcome = run_training(cfg)
    except ConfigError:
        raise
    except Exception as err:  # the run failed after it started: say what is kept
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"swav-ray: error: training failed: {first}\n"
              f"  the MLflow run is marked FAILED; its checkpoints are kept under "
              f"{cfg.scaling.storage_path}; run again with the same scaling.run_name to resume",
              file=sys.stderr)
        return 1
    finally:
        if connected:
            ray.shutdown()
    _print_summary(outcome)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from orchestration.evaluate import evaluate_run

    metrics = evaluate_run(args.run_id, args.tracking_uri, args.device)
    _print_metrics(args.run_id, metrics)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from orchestration.evaluate import explain_run

    metrics = explain_run(args.run_id, args.n, [args.method], args.target, args.tracking_uri,
                          args.device)
    _print_metrics(args.run_id, metrics)
    return 0


def _print_metrics(run_id: str, metrics: dict[str, float]) -> None:
    width = max(len(k) for k in metrics)
    for key, value in sorted(metrics.items()):
        print(f"{key:<{width}}  {value:.4f}")
    print(f"logged into MLflow run {run_id}")


def build_parser() -> argparse.ArgumentParser:
    from swav.counterfactual import METHODS

    parser = argparse.ArgumentParser(
        prog="swav-ray", description="SwAV self-supervised learning on Ray, tracked in MLflow")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train SwAV on a Ray cluster (local if none is given)")
    train.add_argument("config", nargs="?", default=None,
                       help="experiment YAML or a name in experiments/ (default: default)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.3")
    train.set_defaults(func=cmd_train)

    def tracked(name: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text)
        p.add_argument("--run-id", required=True, help="MLflow run of a finished training run")
        p.add_argument("--tracking-uri", default=None,
                       help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
        p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
        return p

    evaluate = tracked("evaluate", "kNN / linear / cluster quality of a run's model, logged into it")
    evaluate.set_defaults(func=cmd_evaluate)
    explain = tracked("explain", "counterfactual explanations of a run's clusters, logged into it")
    explain.add_argument("--n", type=int, default=16, help="held-out images to explain")
    explain.add_argument("--method", choices=METHODS, default="ce",
                         help="ce: early-stopped cross-entropy (default); logit: a tutorial's "
                              "fixed-step recipe")
    explain.add_argument("--target", type=int, default=None,
                         help="target prototype (default: each image's nearest other prototype "
                              "among those that hold a held-out image)")
    explain.set_defaults(func=cmd_explain)
    return parser


def _split_config_and_overrides(args: argparse.Namespace) -> None:
    """``swav-ray train optim.epochs=2``: a first positional with '=' is an override."""
    if getattr(args, "config", None) is not None and "=" in args.config:
        args.overrides = [args.config, *args.overrides]
        args.config = None


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    _split_config_and_overrides(args)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"swav-ray: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
