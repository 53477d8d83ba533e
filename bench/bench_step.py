"""Training-step throughput of the SwAV engine on synthetic crops (no data loading).

Measures what one worker's GPU (or CPU) sustains for the full step: prototype normalisation,
multi-resolution forward, queue, Sinkhorn, loss, backward, optimiser. The engine is built by the
recipe every run uses (``orchestration.recipe``) from the config defaults plus the flags below (or
any dotted override after them). ``--rows`` adds peers, rows alternating every repeat: ``lightly``
(lightly's SwaV parts, one backbone pass per resolution group, SGD; ``bench/lightly_peer.py``),
``ours-sgd`` (our engine with SGD, the same optimiser as that peer), ``ours-compile``
(``model.compile``: ``torch.compile`` of backbone and head, on a GPU only) and ``ours-graphs`` (the
same replayed as CUDA graphs, ``model.compile_mode=reduce-overhead``: for a step bound by its
launches; GPU only), or a variant of ours named by ``--variants`` (its overrides on top of the
others). A row that fails is reported and left out. Every row runs under the configuration's
``model.cudnn_benchmark`` (lightly's too: the same settings), a variant's under its own. ``--thin``
gives every row's ResNet 4 channels a layer: the same operations with next to no arithmetic in them,
so that a step takes what the host needs to issue them.

Each row lives in a process of its own, which builds it once and measures it when its turn comes,
so that what one row leaves behind cannot slow another (in one process, a compiled row slowed the
eager rows that ran after it: BENCHMARKS.md, section "Host share of a step"). Prints one JSON line
per row and repeat and the medians, with each row's ratio to lightly's paired by repeat
(``vs_lightly``: median, min and max, the figure issue 9's 1.05x is read from); ``--profile`` adds
each row's operations per step (CUDA kernels on a GPU) and the costliest of them.

    python bench/bench_step.py --device cuda --backbone resnet50 --batch-size 64 \
        --crops 2x224,6x96 --prototypes 3000 --queue 3840 --optimizer lars
    python bench/bench_step.py --backbone resnet18 --cifar-stem --batch-size 256 \
        --crops 2x32,4x16 --channels-last --rows ours,ours-sgd,lightly --repeats 2
    python bench/bench_step.py --rows ours,nobench --variants "nobench:model.cudnn_benchmark=false"
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestration.config import ConfigError, ExperimentConfig  # noqa: E402
from orchestration.preflight import experiment_from  # noqa: E402
from orchestration.recipe import build_engine, use_cudnn_benchmark  # noqa: E402
from variants import parse_variants  # noqa: E402


# The rows: our engine (LARS, as configured), with SGD, compiled (model.compile), compiled with
# CUDA graphs (torch.compile's "reduce-overhead", GPU only), and lightly's grouped loop.
ROWS = ("ours", "ours-sgd", "ours-compile", "ours-graphs", "lightly")
ROW_OVERRIDES = {"ours-sgd": ["optim.name=sgd"], "ours-compile": ["model.compile=true"],
                 "ours-graphs": ["model.compile=true", "model.compile_mode=reduce-overhead"]}


def crop_overrides(text: str) -> list[str]:
    """``2x224,6x96`` -> the crops section (first group global scales, the others local)."""
    groups = [tuple(int(v) for v in part.split("x")) for part in text.split(",")]
    lows = [0.14] + [0.05] * (len(groups) - 1)
    highs = [1.0] + [0.14] * (len(groups) - 1)
    return [f"crops.nmb_crops={[n for n, _ in groups]}",
            f"crops.size_crops={[s for _, s in groups]}",
            f"crops.min_scale_crops={lows}", f"crops.max_scale_crops={highs}"]


def cfg_overrides(args) -> list[str]:
    return [f"model.backbone={args.backbone}", f"model.cifar_stem={args.cifar_stem}",
            f"model.n_prototypes={args.prototypes}", f"model.channels_last={args.channels_last}",
            f"optim.name={args.optimizer}", "optim.lr=0.6", "optim.warmup_epochs=0",
            f"optim.batch_size={args.batch_size}", "scaling.num_workers=1",
            f"swav.queue_length={args.queue}", "swav.epoch_queue_starts=0",
            "swav.freeze_prototypes_iters=0", *crop_overrides(args.crops), *args.overrides]


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
    ap.add_argument("--rows", default="ours", help=", ".join(ROWS) + " or a variant's name")
    ap.add_argument("--variants", default="",
                    help="rows of ours with overrides: 'nobench:model.cudnn_benchmark=false;...'")
    ap.add_argument("--profile", action="store_true",
                    help="then profile 3 steps per row: operations per step and the costliest")
    ap.add_argument("--thin", action="store_true",
                    help="every row's ResNet with 4 channels a layer: the same operations with "
                         "next to no arithmetic, so the step takes what its host needs to issue "
                         "them (Python, dispatch, launches)")
    ap.add_argument("overrides", nargs="*", help="further dotted config overrides")
    args = ap.parse_args()
    rows = args.rows.split(",")
    args.variants = parse_variants(args.variants, ROWS)
    unknown = set(rows) - set(ROWS) - set(args.variants)
    if unknown:
        ap.error(f"--rows: unknown {sorted(unknown)} ({', '.join(ROWS)} or a variant)")
    for name, extra in args.variants.items():  # checked before any row is built
        try:
            experiment_from({}, [*cfg_overrides(args), *extra])
        except ConfigError as error:
            ap.error(f"--variants: {name}: {error}")
    servers = {row: RowProcess(row, args) for row in rows}
    try:
        rates, peaks, device_name = run_rows(dict(servers), args)
    finally:
        for server in servers.values():
            server.close()
    if not rates:
        raise SystemExit("bench_step: no row ran")
    medians = {row: round(statistics.median(r), 1) for row, r in rates.items() if r}
    print(json.dumps({
        "backbone": args.backbone, "device": device_name, "batch_size": args.batch_size,
        "crops": args.crops, "K": args.prototypes,
        "queue": args.queue, "amp": not args.no_amp, "channels_last": args.channels_last,
        "optimizer": args.optimizer, "median_images_per_s": medians,
        **({"vs_lightly": paired_ratios(rates, "lightly")} if "lightly" in rates else {}),
        "peak_mem_gib": peaks, "torch": torch.__version__,
    }))


def paired_ratios(rates: dict[str, list[float]], base: str) -> dict[str, list[float]]:
    """Each row's images/s over ``base``'s in the same repeat (the rows of a repeat run back to
    back, so a machine that drifts between repeats moves both): [median, min, max] per row."""
    out = {}
    for row, r in rates.items():
        ratios = [a / b for a, b in zip(r, rates[base])] if row != base else []
        if ratios:
            out[row] = [round(v, 3) for v in (statistics.median(ratios), min(ratios), max(ratios))]
    return out


def run_rows(servers: dict, args: argparse.Namespace) -> tuple[dict, dict, str]:
    """Ready every row, then ``args.repeats`` rounds of each row's measurement in turn and the
    profiles; a row that fails is reported as a JSON line and left out of what follows.
    Returns (images/s per row and repeat, peak GiB per row, the device's name)."""
    def ask(row: str, what: str):
        try:
            return servers[row].ask(what)
        except RowFailed as error:
            print(json.dumps({"row": row, "error": str(error)}), flush=True)
            del servers[row]
            return None

    for row in list(servers):
        ask(row, "ready")  # all built, warmed up and compiled before any row is timed
    rates: dict[str, list[float]] = {row: [] for row in servers}
    step_ms: dict[str, list[float]] = {row: [] for row in servers}
    for repeat in range(args.repeats):
        for row in list(servers):
            got = ask(row, "measure")
            if got is not None:
                rate, ms, loss = got
                rates[row].append(rate)
                step_ms[row].append(ms)
                print(json.dumps({"row": row, "repeat": repeat, "images_per_s": round(rate, 1),
                                  "ms_per_step": round(ms, 2), "loss": round(loss, 4)}),
                      flush=True)
    for row in list(servers) if args.profile else []:
        profile = ask(row, "profile")
        if profile is not None:
            # The kernels' (operations') time over the measured step's: near 1, the device is
            # the bound; well under, the host that issues them (BENCHMARKS.md, section "Host
            # share of a step").
            busy = profile["ms_per_step"] / statistics.median(step_ms[row])
            print(json.dumps({"row": row, "profile": {**profile, "busy_share": round(busy, 2)}}),
                  flush=True)
    peaks = {row: servers[row].ask("peak") for row in servers}
    name = next(iter(servers.values())).ask("device") if servers else "none"
    return {row: r for row, r in rates.items() if r}, peaks, name


class RowFailed(Exception):
    """A row's process could not build or run its row (the message says which, and why)."""


class RowProcess:
    """One row in a spawned process of its own (:func:`serve`), asked in turn: ``measure``
    -> (images/s, ms per step, loss); ``profile`` -> dict; ``peak`` -> GiB of GPU memory;
    ``device`` -> its name."""

    def __init__(self, row: str, args: argparse.Namespace) -> None:
        self.row = row
        ctx = mp.get_context("spawn")  # CUDA cannot be forked
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=serve, args=(row, args, child), daemon=True)
        self.process.start()  # it builds and warms up its row at once, beside the others
        child.close()

    def ask(self, what: str):
        try:
            self.conn.send(what)
        except OSError:  # it has ended: its last answer says why
            pass
        try:
            kind, value = self.conn.recv()
        except (EOFError, OSError):  # killed (out of memory, a crash) before it could say
            self.process.join(timeout=5)
            raise RowFailed(f"row {self.row}: its process ended "
                            f"(exit code {self.process.exitcode})") from None
        if kind == "error":
            raise RowFailed(value)
        return value

    def close(self) -> None:
        try:
            self.conn.send("stop")
        except OSError:  # the process has ended (it failed)
            pass
        self.process.join(timeout=60)


def serve(row: str, args: argparse.Namespace, conn) -> None:
    """A row's process: build it, then answer :class:`RowProcess` until ``stop``."""
    try:
        device = torch.device(args.device)
        if args.thin:
            thin_resnets()
        cfg: ExperimentConfig = experiment_from({}, [*cfg_overrides(args),
                                                  *args.variants.get(row, [])])
        use_cudnn_benchmark(cfg, device)  # (our rows' engines set it so too)
        step = make_step(row, cfg, args, device)
        batch = [torch.randn(n * args.batch_size, 3, s, s, device=device)
                 for n, s in zip(cfg.crops.nmb_crops, cfg.crops.size_crops)]
        if args.channels_last:  # crops arrive channels-last (the GPU multi-crop writes them so)
            batch = [b.contiguous(memory_format=torch.channels_last) for b in batch]
        for _ in range(args.warmup):  # (a compiled row compiles here)
            step(batch)
        answers = {
            "ready": lambda: None,
            "measure": lambda: measure(step, batch, args, device),
            "profile": lambda: profile_steps(step, batch, device),
            "peak": lambda: round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if device.type == "cuda" else None,
            "device": lambda: torch.cuda.get_device_name(device)
            if device.type == "cuda" else "cpu",
        }
        for what in iter(conn.recv, "stop"):
            conn.send(("ok", answers[what]()))
    except Exception as error:  # noqa: BLE001  (the parent says which row failed, and how)
        conn.send(("error", f"row {row}: {type(error).__name__}: {error}"))


def thin_resnets(width: int = 4) -> None:
    """From now on in this process, every ResNet backbone (ours and the lightly row's, both
    built by ``swav.model.build_backbone``) has ``width`` channels in every layer: torchvision's
    operations in torchvision's order, next to no arithmetic."""
    import lightly_peer
    import swav.model
    from torch import nn

    build = swav.model.build_backbone

    def thin(name: str, cifar_stem: bool = False, **kwargs):
        net, dim = build(name, cifar_stem=cifar_stem, **kwargs)
        if name == "convnet":
            return net, dim
        for module in list(net.modules()):
            for child_name, child in module.named_children():
                if isinstance(child, nn.Conv2d):
                    setattr(module, child_name, nn.Conv2d(
                        3 if child.in_channels == 3 else width, width, child.kernel_size,
                        child.stride, child.padding, bias=False))
                elif isinstance(child, nn.BatchNorm2d):
                    setattr(module, child_name, nn.BatchNorm2d(width))
        return net, width

    swav.model.build_backbone = lightly_peer.build_backbone = thin


def make_step(row: str, cfg: ExperimentConfig, args, device: torch.device):
    """A ``step(crop_groups) -> loss`` callable for one row, warmed up to its steady state."""
    total = (args.warmup + args.steps) * args.repeats + 64
    if row == "lightly":
        from lightly_peer import grouped_step

        return grouped_step(args.backbone, args.cifar_stem, args.prototypes,
                            cfg.crops.nmb_crops, lr=0.1, device=device,
                            channels_last=args.channels_last)
    if row in ROW_OVERRIDES:  # (model.compile: GPU only)
        cfg = experiment_from({}, [*cfg_overrides(args), *ROW_OVERRIDES[row]])
    engine = build_engine(cfg, total, device, args.batch_size, amp=not args.no_amp)
    engine.start_queue(epoch=0)
    fill = [torch.randn(n * args.batch_size, 3, s, s, device=device)
            for n, s in zip(cfg.crops.nmb_crops, cfg.crops.size_crops)]
    while engine.queue is not None and not engine.queue.full:  # the steady state: a full queue
        engine.step(fill)
    return lambda groups: engine.step(groups)[0]


def measure(step, batch, args, device: torch.device) -> tuple[float, float, float]:
    """(images/s, ms per step, last loss) of ``args.steps`` steps after ``args.warmup``."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step(batch)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step(batch)
    sync()
    seconds = time.perf_counter() - start
    return args.steps * args.batch_size / seconds, 1000 * seconds / args.steps, float(loss)


# Operations that only describe or allocate tensors: no kernel runs for them.
NO_KERNEL = {"empty", "empty_like", "empty_strided", "as_strided", "as_strided_", "resize_",
             "detach", "view", "_reshape_alias", "alias", "t", "transpose", "expand", "unsqueeze",
             "squeeze", "slice", "select", "permute", "unbind", "split", "narrow", "reshape",
             "flatten", "_unsafe_view", "result_type", "lift_fresh", "to", "_to_copy", "item",
             "_local_scalar_dense", "is_nonzero", "set_"}


def profile_steps(step, batch, device: torch.device, steps: int = 3) -> dict:
    """Operations per step and the ten costliest (ms per step): CUDA kernels on a GPU; on the
    CPU, the ATen operations that do work (leaves of the call tree), a proxy for kernels."""
    from torch.profiler import DeviceType, ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(batch)
        if cuda:
            torch.cuda.synchronize(device)
    if cuda:
        # Kernels only: a user annotation (``Optimizer.step#LARS.step``) spans its kernels on
        # the GPU timeline, gaps included: summed with them, it would count that time twice.
        ops = [e for e in prof.events() if e.device_type == DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False)]
        cost = lambda e: e.device_time  # noqa: E731  (microseconds)
    else:
        def works(e) -> bool:
            return e.name.startswith("aten::") and e.name[6:] not in NO_KERNEL

        ops = [e for e in prof.events() if works(e) and not any(map(works, e.cpu_children))]
        cost = lambda e: e.self_cpu_time_total  # noqa: E731
    totals: dict[str, float] = {}
    for e in ops:
        totals[e.name] = totals.get(e.name, 0.0) + cost(e)
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:10]
    return {"ops_per_step": round(len(ops) / steps, 1),
            "ms_per_step": round(sum(totals.values()) / steps / 1000, 3),
            "top_ms_per_step": {name[:80]: round(us / steps / 1000, 3) for name, us in top}}


if __name__ == "__main__":
    main()
