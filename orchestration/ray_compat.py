"""Every use of Ray's internals, behind one door.

Ray's public API leaves a few things this project needs out; each is done here, once, with a
test in ``tests/test_ray_compat.py`` that fails when the Ray version in use moves the internal it
relies on.  pyproject pins Ray to the minor version those tests run on.  Where an internal has
moved, each function falls back to Ray's stock behaviour rather than failing a run.

- :func:`refused_for_want_of_token`: one probe of a cluster's GCS (``ray._raylet.GcsClient``),
  because ``ray.init`` retries an authentication refusal for about 20 s before it says so.
- :func:`quiet_ray_notes`: Ray's notes that a run's own lines already cover
  (``ray._private.worker.print_to_stdstream``, ``ray._private.authentication``'s logger).
- :func:`autoscaler_node_groups`: the autoscaler's declared node groups
  (``ray._private.state``), the only place a cluster's largest size is published.
- :class:`TorchTrainer`: Ray Train's trainer without its Ray Data callback when a run passes no
  Ray Datasets (``_create_default_callbacks``): one actor process less per run.
- :class:`NodeAddressTorchConfig`: torch.distributed's rendezvous store bound to the node's
  address, not to every interface (``ray.train.torch.config._TorchBackend`` and its
  module-level ``get_address_and_port``).
- :func:`checkpoint_destination`: where Ray Train puts a checkpoint of a given folder name (the
  run's ``StorageContext``), for an upload that lands whole.
- :func:`trial_stop_event`: the event Tune sets when it stops a function trial whose actor it
  reuses (``ray.train._internal.session``), and :data:`TRIAL_THREAD_TIMEOUT_ENV`, how long
  ``FunctionTrainable.reset_config`` waits for that trial's function to return.
"""

from __future__ import annotations

import logging
import socket
from datetime import timedelta
from typing import Any

import ray
import ray.train
import ray.train.torch
import ray.train.torch.config as ray_torch_config
from ray.train.torch import TorchConfig

__all__ = ["TRIAL_THREAD_TIMEOUT_ENV", "NodeAddressTorchConfig", "TorchTrainer",
           "autoscaler_node_groups", "checkpoint_destination", "listen_on_node_address",
           "quiet_ray_notes", "refused_for_want_of_token", "trial_stop_event"]

log = logging.getLogger(__name__)


# -- joining a cluster ------------------------------------------------------------------------

def refused_for_want_of_token(address: str) -> bool:
    """One connection to the GCS at ``host:port``: True when it refuses us for want of a token.

    ``ray.init`` retries that refusal once a second for about 20 s before it fails; one probe
    answers in under a second.  Anything else (no ``host:port``, nothing listening, another
    error, Ray's internals moved) is left to ``ray.init`` to report."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return False
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        return False
    try:
        from ray._raylet import GcsClient
        from ray.exceptions import AuthenticationError
    except ImportError:
        return False
    try:
        GcsClient(address=address)
    except AuthenticationError:
        return True
    except Exception:  # noqa: BLE001 - ray.init says what it is
        return False
    return False


def quiet_ray_notes() -> None:
    """Ray's notes that a run's own lines already cover, at default verbosity: "Token
    authentication is enabled for this Ray cluster" (Ray's default, on every start), and the
    raylet's paragraph on every lost worker, "A worker died or was killed ..." (the run says
    which attempt failed and what it does next). Ray prints the latter through a module-level
    function of its driver, looked up at each call."""
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    try:
        import ray._private.worker as ray_driver
    except ImportError:  # Ray's internals moved: its note shows
        return
    shown = ray_driver.print_to_stdstream
    if getattr(shown, "quiet", False):
        return

    def print_to_stdstream(data, ignore_prefix):
        if data.get("pid") == "raylet" and any(
                "A worker died or was killed" in line for line in data.get("lines", ())):
            return
        shown(data, ignore_prefix)

    print_to_stdstream.quiet = True
    ray_driver.print_to_stdstream = print_to_stdstream


# -- the cluster's size -----------------------------------------------------------------------

def autoscaler_node_groups() -> list[tuple[str, float, float, int]] | None:
    """``(name, CPUs, GPUs, most nodes)`` of each node group the autoscaler declared to the GCS
    (-1 nodes: no limit); None where the cluster does not autoscale or Ray's internals moved."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # an older or non-autoscaling GCS
        return None
    if config is None or not config.node_group_configs:
        return None
    return [(g.name, float(g.resources.get("CPU", 0)), float(g.resources.get("GPU", 0)),
             int(g.max_count)) for g in config.node_group_configs]


# -- the trainer ------------------------------------------------------------------------------

class TorchTrainer(ray.train.torch.TorchTrainer):
    """``TorchTrainer`` without Ray Data's part when the run passes no Ray Datasets (ours read
    their data in the workers): Ray Train starts a ``DatasetManager`` actor for every run all the
    same, one more process importing Ray Data, and sends each worker Ray Data's context. Where
    Ray's internals differ, this changes nothing."""

    def _create_default_callbacks(self) -> list:
        callbacks = super()._create_default_callbacks()
        if getattr(self, "datasets", None):
            return callbacks
        return [c for c in callbacks if type(c).__name__ != "DatasetsCallback"]


# -- the process group's rendezvous -----------------------------------------------------------
#
# Ray Train sets the process group up with ``init_method="env://"``: rank 0 hosts a ``TCPStore``
# that every rank connects to, and torch binds that server to every interface of the machine, so
# a training run would accept connections from any network the machine is on (on a laptop, the
# cafe's). Here rank 0 first opens the store itself on a socket bound to the node's address (the
# one Ray gives the other ranks: 127.0.0.1 on the local instance ``swav-ray`` starts), and
# torch's own store then shares that server (a multi-tenant store of the same port) instead of
# binding another.

# Rank 0's listening socket and store, kept for the worker process's life.
_HELD: list[Any] = []


def listen_on_node_address() -> tuple[str, int]:
    """In rank 0's worker: the store's server on a free port of the node's address; that
    address and port (what Ray Train's ``get_address_and_port`` returns, with the port open)."""
    import torch.distributed as dist

    address = ray.util.get_node_ip_address()
    try:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.bind((address, 0))
        listener.listen(1024)
        port = listener.getsockname()[1]
        store = dist.TCPStore(address, port, None, True, timedelta(minutes=30),
                              wait_for_workers=False, multi_tenant=True,
                              master_listen_fd=listener.fileno())
    except (OSError, RuntimeError, TypeError) as err:  # an older torch; an odd address
        log.warning("torch.distributed's store listens on every interface (%s)", err)
        return ray_torch_config.get_address_and_port()
    _HELD[:] = [listener, store]
    return address, port


class _NodeAddressBackend(ray_torch_config._TorchBackend):
    def on_start(self, worker_group, backend_config) -> None:
        # Ray Train asks rank 0 for an address and a free port through this module-level name.
        ray_torch_config.get_address_and_port = listen_on_node_address
        super().on_start(worker_group, backend_config)


class NodeAddressTorchConfig(TorchConfig):
    """Ray Train's ``TorchConfig`` with the rendezvous store on the node's address only."""

    @property
    def backend_cls(self):
        return _NodeAddressBackend


# -- checkpoints ------------------------------------------------------------------------------

def checkpoint_destination(name: str) -> tuple[Any, str]:
    """In a Train worker: the run's storage file system (pyarrow) and the path Ray Train gives a
    checkpoint folder called ``name``."""
    storage = ray.train.get_context().get_storage()
    return storage.storage_filesystem, storage.build_checkpoint_path_from_name(name)


TRIAL_THREAD_TIMEOUT_ENV = "TUNE_FUNCTION_THREAD_TIMEOUT_S"  # read at each reset, default 2 s


def trial_stop_event():
    """The stop event of the Tune function trial running in this process (set when Tune stops
    the trial to reuse its actor, or ends the sweep); None outside a trial or where Ray moved
    it."""
    try:
        from ray.train._internal.session import get_session
    except ImportError:
        return None
    session = get_session()
    return getattr(session, "stop_event", None)
