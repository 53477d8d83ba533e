"""torch.distributed's rendezvous store listening on the node's address only.

Ray Train sets the process group up with ``init_method="env://"``: rank 0 hosts a ``TCPStore``
that every rank connects to, and torch binds that server to every interface of the machine, so
a training run would accept connections from any network the machine is on (on a laptop, the
cafe's). Here rank 0 first opens the store itself on a socket bound to the node's address (the
one Ray gives the other ranks: 127.0.0.1 on the local instance ``swav-ray`` starts), and
torch's own store then shares that server (a multi-tenant store of the same port) instead of
binding another.
"""

from __future__ import annotations

import logging
import socket
from datetime import timedelta
from typing import Any

import ray
import ray.train.torch.config as ray_torch_config
from ray.train.torch import TorchConfig

__all__ = ["NodeAddressTorchConfig", "listen_on_node_address"]

log = logging.getLogger(__name__)
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
