"""Shared fixtures: a real local Ray instance for the integration tests; a recorder of the
operations that would make the host wait for a GPU."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Every Ray instance the tests start (in process, `ray start`, the CLI's own) inherits this: the
# Train controller polls its workers every 0.25 s instead of 2 s, so a tiny run does not wait
# up to 2 s per epoch for its report to be taken (as `swav-ray train` sets it for local runs).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Nor does a run start Ray Train's preemption watcher (an actor, a process per run, that polls the
# nodes for spot-instance preemption): one machine has nothing to watch (as the CLI does locally).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def _script(name: str):
    """A script of ``scripts/`` as a module (they are run as files, not installed)."""
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


local_cluster = _script("local_cluster")
moto_server = local_cluster.s3_server  # moto's S3 server on 127.0.0.1, stopped by its PID

S3_CLIENT = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
             "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray instance (never attaches to another cluster on the machine).

    3 logical CPUs: the Train controller plus 2 workers fit on a 2-core machine.
    """
    import ray


    ray.init(address="local", num_cpus=3, num_gpus=0, include_dashboard=True,
             log_to_driver=False)
    yield ray
    ray.shutdown()


CHECKOUT = Path(__file__).resolve().parents[1]
# What a run writes into its working directory by default: never into the checkout from a test.
DEFAULT_OUTPUTS = ("mlruns", "mlflow.db", "runs", "mlartifacts")


@pytest.fixture(autouse=True, scope="session")
def _checkout_left_clean():
    """Fails the session when a test wrote MLflow's or a run's default outputs into the checkout
    (an experiment created without an artifact location puts ``mlruns/`` in the cwd)."""
    before = {name for name in DEFAULT_OUTPUTS if (CHECKOUT / name).exists()}
    yield
    added = sorted({name for name in DEFAULT_OUTPUTS if (CHECKOUT / name).exists()} - before)
    assert not added, f"tests wrote {added} into the checkout {CHECKOUT}"


@pytest.fixture(autouse=True)
def _environment_restored():
    """A test that runs the CLI in this process (which sets Ray's loopback switch, for instance)
    leaves the environment of the processes later tests start as it found it."""
    before = dict(os.environ)
    yield
    if os.environ != before:
        os.environ.clear()
        os.environ.update(before)


# ATen operations whose result the host reads: on a GPU each waits for every kernel queued before
# it (``item()``/``float()``, ``bool()``, a boolean mask as an index, sizes that depend on values;
# ``repeat_interleave`` by a tensor of counts, not by an int).
READ_BACK = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "unique", "_unique",
             "_unique2", "unique_dim", "unique_consecutive", "equal", "bincount",
             "repeat_interleave"}
MASK_INDEXED = {"index", "index_put", "index_put_", "_index_put_impl_"}


class HostReads(TorchDispatchMode):
    """Records, in order, each :data:`READ_BACK` operation run under it (on any device: on the
    CPU the same code shows where it would wait for a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in READ_BACK and func._overloadname != "self_int":
            self.seen.append(name)
        elif name in MASK_INDEXED and any(  # (a mask's nonzero runs inside the kernel here)
                getattr(i, "dtype", None) in (torch.bool, torch.uint8) for i in args[1]):
            self.seen.append(f"{name} by a boolean mask")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_reads() -> type[HostReads]:
    return HostReads


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """An S3-compatible server on 127.0.0.1 (moto's: the S3 HTTP API over a real socket) for the
    session; its endpoint URL."""
    with moto_server(tmp_path_factory.mktemp("s3")) as url:
        yield url


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This process set up as any S3 client is (the standard AWS variables) for the server."""
    for key, value in {"AWS_ENDPOINT_URL": s3_server, **S3_CLIENT}.items():
        monkeypatch.setenv(key, value)
    return s3_server
