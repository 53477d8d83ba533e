"""``swav-ray``: the command line.

    swav-ray train [CONFIG] [section.key=value ...]
    swav-ray tune SWEEP [section.key=value ...] [--name NAME]
    swav-ray tune --resume NAME [--storage DIR]
    swav-ray evaluate --run-id ID
    swav-ray explain --run-id ID [--n N] [--method ce|logit] [--target other_label|nearest|K]

CONFIG is a YAML file or the name of one in ``experiments/`` (default: ``experiments/default.yaml``,
the embedded digits run).  The configuration is validated before Ray starts.  With
``RAY_ADDRESS`` set (as under ``ray job submit``) the command joins that cluster; otherwise it
starts a local Ray instance sized for the run.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from orchestration.config import ConfigError, ExperimentConfig, load_config

__all__ = ["connect_ray", "main"]


def connect_ray(cfg: ExperimentConfig, extra_cpus: float = 0.0, log_to_driver: bool = True
                ) -> bool:
    """Join the cluster named by RAY_ADDRESS, or start a local one (room for the run's workers
    plus ``extra_cpus``). True when this call did."""
    import ray

    from orchestration.ray_compat import refused_for_want_of_token

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
        check_ray_address(address)
        if refused_for_want_of_token(address):
            raise _missing_token(address)
        try:
            ray.init(log_to_driver=log_to_driver,
                     logging_level=logging.INFO if log_to_driver else logging.WARNING)
        except ConnectionError as err:
            if "AuthenticationError" not in repr(err.__cause__) + str(err.__cause__):
                raise
            raise _missing_token(address) from None
        return True
    sc = cfg.scaling
    needed = sc.num_workers * sc.cpus_per_worker + extra_cpus
    # Ray Train's controller takes the workers' reports when it polls them, every 2 s by default:
    # up to 2 s per epoch of waiting, long beside a small run's epochs. The instance we start
    # (and so the controller) inherits this process's environment.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    # Ray Train watches the cluster's nodes for preemption (spot instances) with an actor of its
    # own, a process per run; one machine has nothing to watch.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(needed)),
             num_gpus=None if sc.use_gpu else 0, include_dashboard=True,
             log_to_driver=log_to_driver,
             logging_level=logging.INFO if log_to_driver else logging.WARNING)
    return True


def _missing_token(address: str) -> ConfigError:
    return ConfigError(
        f"RAY_ADDRESS: the cluster at {address} wants its auth token: "
        "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or copy ~/.ray/auth_token from the "
        "head; `ray get-auth-token` there prints it)")


def _print_summary(outcome) -> None:
    uri = outcome.tracking_uri
    m = outcome.metrics
    epochs = int(m["epoch"]) + 1 if "epoch" in m else "?"
    shown = [f"{k} {m[k]:.4f}" for k in ("loss", "knn_top1") if m.get(k) is not None]
    if m.get("prototypes_used") is not None:
        shown.append(f"prototypes_used {m['prototypes_used']:.0f}")
    print(f"\nrun {outcome.run_name} finished after {epochs} epochs: {', '.join(shown)}")
    _print_evaluation(m)
    print(f"MLflow run id: {outcome.run_id}")
    print(f"checkpoint: {outcome.checkpoint_path}")
    print(f"view it: mlflow ui --backend-store-uri {uri}" if not uri.startswith("http")
          else f"view it: {uri}")


def _print_evaluation(m: dict, prefix: str = "") -> None:
    """The final evaluation and counterfactual figures of a run, when they ran."""
    from swav.counterfactual import METHODS

    if "eval_linear_top1" in m:
        print(f"{prefix}evaluation (held-out): kNN top-1 {m['eval_knn_top1']:.3f} (random init "
              f"{m['eval_knn_top1_random_init']:.3f}), linear top-1 "
              f"{m['eval_linear_top1']:.3f} (random init {m['eval_linear_top1_random_init']:.3f})"
              f", NMI {m['eval_nmi']:.3f}, ARI {m['eval_ari']:.3f}")
    for method in METHODS:
        if f"{method}_cf_validity" in m:
            print(f"{prefix}counterfactuals ({method}): validity "
                  f"{m[f'{method}_cf_validity']:.3f}, mean L2 {m[f'{method}_cf_l2']:.3f}, "
                  f"mean steps {m[f'{method}_cf_steps']:.1f}")


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # keys and types, before torch is imported
    from orchestration import preflight

    preflight.validate(cfg)
    if args.print_config:  # the whole config as the run would log it (config.yaml), and no run
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from orchestration.checkpoints import default_run_name

    experiment = Path(args.config).stem if args.config else "default"
    name = cfg.scaling.run_name or default_run_name(experiment)
    if not args.verbose:  # MLflow's notes (where it was imported before main()) and its
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # pickle warning (see README)
        logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    splits = preflight.check_train(cfg, name)  # every check before Ray starts
    import ray

    from orchestration.failures import TrainingFailed
    from orchestration.ray_compat import quiet_ray_notes
    from orchestration.tracking import source_tags
    from orchestration.train import run_training

    tags = {"swav_ray.experiment_file": args.config or "(embedded default)",
            "swav_ray.overrides": " ".join(args.overrides) or "(none)",
            **source_tags(args.command_line)}
    if not args.verbose:
        quiet_ray_notes()
    connected = connect_ray(cfg, log_to_driver=args.verbose)
    try:
        outcome = run_training(cfg, run_name=name, tags=tags, console=True, splits=splits)
    except TrainingFailed as err:  # the run started and failed: what is kept, then the cause
        print(_failure_report(err), file=sys.stderr)
        return 2 if err.bad_input else 1
    except KeyboardInterrupt:
        print(f"swav-ray: interrupted; the MLflow run is marked KILLED and its checkpoints are "
              f"kept: run again with scaling.run_name={name} to resume", file=sys.stderr)
        return 130
    except ConfigError:
        raise
    except Exception as err:  # e.g. the tracking store failed: the run is marked FAILED
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"swav-ray: error: training failed: {first}", file=sys.stderr)
        return 1
    finally:
        if connected:
            ray.shutdown()
    _print_summary(outcome)
    return 0


def _failure_report(err) -> str:
    """Lines for a run that failed after it started; the last one names the cause."""
    name = err.run_dir.rstrip("/").rpartition("/")[2] if err.run_dir else ""
    kept = (f"its checkpoints are kept under {err.run_dir}; once the cause is fixed, run "
            f"again with scaling.run_name={name} to resume" if err.run_dir
            else "it wrote no checkpoint")
    retried = "" if err.attempts == 1 else f" after {err.attempts} attempts"
    why = " (not retried: it fails the same way on every attempt)" if err.not_retryable else ""
    return (f"swav-ray: the MLflow run is marked FAILED{retried}; {kept}\n"
            f"swav-ray: error: training failed{why}: {err.cause}")


def cmd_tune(args: argparse.Namespace) -> int:
    from orchestration.sweep import load_sweep

    if args.resume:
        from orchestration.tuning import load_saved_spec

        if args.sweep is not None:
            raise ConfigError("resume: give the sweep's name only (its spec is stored with it)")
        spec = load_saved_spec(_storage_root(args.storage), args.resume)
    else:
        if args.sweep is None:
            raise ConfigError("sweep: name a sweep file (e.g. experiments/sweep_default.yaml) "
                              "or --resume NAME")
        spec = load_sweep(args.sweep, args.overrides)  # every trial's config validated
    from orchestration import preflight

    preflight.check_sweep(spec)  # every check before Ray starts
    # Quiet console: our progress bar and table instead of Tune's status tables, and our lines
    # on an interruption instead of Tune's (which offer Tuner.restore(...) as the way back).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray

    from orchestration.ray_compat import quiet_ray_notes

    quiet_ray_notes()
    logging.getLogger("ray.tune.tune").setLevel(logging.ERROR)

    from orchestration.tuning import DRIVER_CPU, run_sweep, trial_count

    connected = connect_ray(spec.base_config(), extra_cpus=DRIVER_CPU, log_to_driver=False)
    try:
        outcome = run_sweep(spec, name=args.resume or args.name, resume=bool(args.resume),
                            command=args.command_line,
                            progress=True)
    except ConfigError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"swav-ray: error: sweep failed: {first}\n  finished trials and checkpoints are "
              f"kept; continue with swav-ray tune --resume NAME", file=sys.stderr)
        return 1
    finally:
        if connected:
            ray.shutdown()
    _print_sweep(outcome, spec)
    if outcome.unfinished:
        print(f"swav-ray: sweep interrupted: {outcome.unfinished} of {trial_count(spec)} trials "
              f"did not finish; the sweep's run and theirs are marked KILLED; "
              f"continue with swav-ray tune --resume {outcome.name}", file=sys.stderr)
        return 1
    return 0


def _storage_root(storage: str | None) -> str:
    from orchestration.checkpoints import storage_root
    from orchestration.config import ScalingConfig

    cfg = ExperimentConfig()
    cfg.scaling = ScalingConfig(storage_path=storage or ScalingConfig().storage_path)
    return storage_root(cfg)


def _print_sweep(outcome, spec) -> None:
    from orchestration.sweep_report import format_table

    n = len(outcome.rows)
    print(f"\nsweep {outcome.name}: {n} trial{'' if n == 1 else 's'}, metric {spec.metric} "
          f"({spec.mode}, at each trial's last epoch)")
    print(format_table(outcome.rows, spec, outcome.best))
    if outcome.best is not None:
        b = outcome.best
        print(f"best: trial {b.trial_id} (MLflow run {b.run_id}), {spec.metric} {b.metric:.4f}: "
              + ", ".join(f"{k}={v}" for k, v in b.values.items()))
        print("best config: sweep/best_config.yaml in the parent run (swav-ray train takes it "
              "as is)")
    _print_evaluation(outcome.best_metrics, prefix="best trial ")
    uri = outcome.tracking_uri
    print(f"MLflow parent run id: {outcome.parent_run_id}")
    print(f"view it: mlflow ui --backend-store-uri {uri}" if not uri.startswith("http")
          else f"view it: {uri}")


def _run_id(args: argparse.Namespace) -> str:
    """``--run-id``, or the run behind ``--model models:/NAME@ALIAS`` (or ``/VERSION``)."""
    if args.run_id:
        return args.run_id
    from orchestration.tracking import resolve_tracking_uri, run_of_model

    args.run_id = run_of_model(args.model, resolve_tracking_uri(args.tracking_uri))
    return args.run_id


def cmd_evaluate(args: argparse.Namespace) -> int:
    from orchestration.evaluate import evaluate_run

    _run_id(args)
    metrics = evaluate_run(args.run_id, args.tracking_uri, args.device, args.prototypes)
    _print_metrics(args.run_id, metrics)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from orchestration.evaluate import explain_run

    _run_id(args)
    metrics = explain_run(args.run_id, args.n, [args.method], args.target, args.tracking_uri,
                          args.device)
    _print_metrics(args.run_id, metrics)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from orchestration.pretrained import export_backbone

    print(export_backbone(_run_id(args), Path(args.out), args.tracking_uri))
    return 0


def _indices(text: str) -> list[int]:
    """``--prototypes 3,17,42``."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected prototype indices like 3,17,42, got {text!r}"
                                         ) from None


def _target(text: str) -> int | str:
    """``--target``: a prototype index or a mode name (checked by explain_run)."""
    return int(text) if text.isdigit() else text


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
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved config (every key, as YAML: a file train takes) "
                            "and exit without training")
    train.add_argument("-v", "--verbose", action="store_true",
                       help="show Ray's and the workers' own output")
    train.set_defaults(func=cmd_train)

    tune_p = sub.add_parser("tune", help="sweep SwAV settings with Ray Tune (trials are Ray "
                                          "Train runs, nested in one MLflow parent run)")
    tune_p.add_argument("sweep", nargs="?", default=None,
                        help="sweep YAML or a name in experiments/ (e.g. sweep_default)")
    tune_p.add_argument("overrides", nargs="*", help="dotted overrides of the base experiment")
    tune_p.add_argument("--name", default=None, help="sweep name (default: sweep-<file>-<time>)")
    tune_p.add_argument("--resume", metavar="NAME", default=None,
                        help="continue an interrupted sweep: finished trials are kept, unfinished "
                             "ones resume from their last checkpoint")
    tune_p.add_argument("--storage", default=None,
                        help="with --resume: the sweep's scaling.storage_path, if not the default")
    tune_p.set_defaults(func=cmd_tune)

    def which_run(p: argparse.ArgumentParser) -> None:
        run = p.add_mutually_exclusive_group(required=True)
        run.add_argument("--run-id", help="MLflow run of a finished training run")
        run.add_argument("--model", metavar="models:/NAME@ALIAS",
                         help="a registered model (models:/NAME@best, models:/NAME/3): its run")
        p.add_argument("--tracking-uri", default=None,
                       help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")

    def tracked(name: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text)
        which_run(p)
        p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
        return p

    evaluate = tracked("evaluate", "kNN / linear / cluster quality of a run's model, logged into it")
    evaluate.add_argument("--prototypes", type=_indices, default=None, metavar="K,K,...",
                          help="also a gallery of these prototypes' top members "
                               "(clusters/prototype_members_chosen.png)")
    evaluate.set_defaults(func=cmd_evaluate)
    explain = tracked("explain", "counterfactual explanations of a run's clusters, logged into it")
    explain.add_argument("--n", type=int, default=16, help="held-out images to explain")
    explain.add_argument("--method", choices=METHODS, default="ce",
                         help="ce: early-stopped cross-entropy (default); logit: a tutorial's "
                              "fixed-step recipe")
    explain.add_argument("--target", type=_target, default="other_label",
                         help="other_label (default): each image's nearest prototype whose "
                              "held-out images are mostly of another label; nearest: its nearest "
                              "other prototype that holds a held-out image; or a prototype index")
    explain.set_defaults(func=cmd_explain)
    export = sub.add_parser("export", help="write a run's trained backbone alone, keys as its "
                                           "library names them (torchvision, or swav.model's "
                                           "ConvNet)")
    which_run(export)
    export.add_argument("out", help="the file to write: NAME.pt (torch.save of a state dict) or "
                                    "NAME.safetensors (needs the safetensors package)")
    export.set_defaults(func=cmd_export)
    return parser


def _split_config_and_overrides(args: argparse.Namespace) -> None:
    """``swav-ray train optim.epochs=2``: a first positional with '=' is an override."""
    for name in ("config", "sweep"):
        if getattr(args, name, None) is not None and "=" in getattr(args, name):
            args.overrides = [getattr(args, name), *args.overrides]
            setattr(args, name, None)


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def loopback_only() -> None:
    """Keep Ray on 127.0.0.1 where that is where the cluster is. Without ``RAY_ADDRESS``, the
    instance this process starts listens on 127.0.0.1 only (GCS, raylet, agents, dashboard,
    metrics): by default Ray binds them to the machine's address so that other nodes may join,
    which a local run never needs. With a loopback ``RAY_ADDRESS`` (a cluster of several nodes
    on this machine), Ray would rewrite the address to the machine's own and never reach a head
    that listens on 127.0.0.1 only: kept as given when the head answers there and not on the
    machine's address. Ray reads the switch when it is imported, so it is set before that."""
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        return
    where = _host_port(address)
    if where is None or where[0] not in LOOPBACK_HOSTS or not _answers(*where):
        return
    if not _answers(_own_address(), where[1]):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _host_port(address: str) -> tuple[str, int] | None:
    """``host:port`` of a GCS address; None for ``auto``, ``ray://...`` and other forms."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address or not host:
        return None
    return host.strip("[]"), int(port)


def _answers(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _own_address() -> str:
    """The address Ray gives this machine: the one its default route leaves from (no packet is
    sent), as Ray finds it."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("8.8.8.8", 53))
            return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def check_ray_address(address: str) -> None:
    """A ``host:port`` that nothing answers at: one line at once (``ray.init`` retries it for
    minutes)."""
    where = _host_port(address)
    if where is not None and not _answers(*where):
        raise ConfigError(f"RAY_ADDRESS: no Ray cluster answers at {address} (start its head "
                          f"with `ray start --head`, or unset RAY_ADDRESS to train on this "
                          f"machine alone)")


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow's "View run ... at: http://..." after each run it ends: the summary says it once.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    loopback_only()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if not getattr(args, "verbose", False):
        # MLflow sets its loggers to INFO when it is imported (a new store's "Creating initial
        # MLflow database tables..."): this is the level it reads then.
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    args.command_line = shlex.join(["swav-ray", *(sys.argv[1:] if argv is None else argv)])
    _split_config_and_overrides(args)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"swav-ray: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
