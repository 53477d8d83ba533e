"""Each use of Ray's internals (orchestration/ray_compat.py) against the Ray installed: these fail
when a Ray release moves what a workaround relies on."""

from __future__ import annotations

import socket

import psutil
import ray.train
import ray.train.torch

from orchestration.ray_compat import (
    TorchTrainer,
    autoscaler_node_groups,
    listen_on_node_address,
    quiet_ray_notes,
    refused_for_want_of_token,
)


def test_ray_s_paragraph_on_a_lost_worker_is_silenced_at_default_verbosity(capsys, monkeypatch):
    """The driver prints the raylet's errors through one function; a lost worker's paragraph is
    dropped (the run's own line says what failed), any other error still shows."""
    import ray._private.worker as ray_driver

    monkeypatch.setattr(ray_driver, "print_to_stdstream", ray_driver.print_to_stdstream)
    quiet_ray_notes()
    quiet_ray_notes()  # (once wrapped is enough)
    death = "A worker died or was killed while executing a task by an unexpected system error."
    ray_driver.print_to_stdstream({"lines": [death], "pid": "raylet", "is_err": False}, False)
    ray_driver.print_to_stdstream({"lines": ["The node ran out of memory"], "pid": "raylet",
                                   "is_err": False}, False)
    out = capsys.readouterr().out
    assert "A worker died" not in out and "The node ran out of memory" in out


def test_a_run_without_ray_datasets_starts_no_ray_data_actor():
    """Ray Train starts a DatasetManager actor (a process) per run even with no datasets; ours
    read their data in the workers, so the trainer leaves that callback out, and only that."""
    def names(trainer) -> list[str]:
        return [type(c).__name__ for c in trainer._create_default_callbacks()]

    scaling = ray.train.ScalingConfig(num_workers=1)
    stock = names(ray.train.torch.TorchTrainer(lambda config: None, scaling_config=scaling))
    ours = names(TorchTrainer(lambda config: None, scaling_config=scaling))
    assert "DatasetsCallback" in stock
    assert ours == [name for name in stock if name != "DatasetsCallback"]


def test_the_token_probe_leaves_anything_but_a_refusal_to_ray_init():
    """No ``host:port``, a URI, nothing listening: False at once (ray.init reports those). The
    refusal itself is tested against a real token cluster in test_local_cluster.py."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # closed again: nothing listens there
    for address in ("auto", "ray://127.0.0.1:10001", f"127.0.0.1:{port}"):
        assert refused_for_want_of_token(address) is False, address


def test_the_autoscaler_s_groups_are_none_where_nothing_autoscales(ray_local):
    """The internal state API answers on a local instance (no autoscaler: None), rather than
    raising or returning something else."""
    assert autoscaler_node_groups() is None
    from ray._private.state import state  # the internal it reads, where it reads it

    assert callable(state.get_cluster_config)


def test_the_rendezvous_store_listens_on_the_node_address_only(ray_local):
    """Rank 0's TCPStore as the worker opens it: bound to the node's address, not 0.0.0.0."""
    import ray.train.torch.config as ray_torch_config

    assert callable(ray_torch_config.get_address_and_port)  # the name the backend replaces
    assert hasattr(ray_torch_config, "_TorchBackend")
    address, port = listen_on_node_address()
    bound = {c.laddr.ip for c in psutil.Process().net_connections("tcp")
             if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert bound == {address} and address not in ("0.0.0.0", "::")


def test_tune_s_stop_event_and_reset_wait_are_where_trial_stop_reads_them():
    """The reused-actor stop (orchestration/trial_stop.py) needs the trial session's stop event,
    set by Tune's reset before it waits TRIAL_THREAD_TIMEOUT_ENV seconds for the function."""
    import inspect

    from ray.train._internal.session import _TrainSession
    from ray.tune.trainable.function_trainable import FunctionTrainable

    from orchestration.ray_compat import TRIAL_THREAD_TIMEOUT_ENV, trial_stop_event

    assert trial_stop_event() is None  # (no trial in this process)
    assert "self.stop_event.set()" in inspect.getsource(_TrainSession.finish)
    reset = inspect.getsource(FunctionTrainable.reset_config)
    assert TRIAL_THREAD_TIMEOUT_ENV in reset and "session.finish(timeout=" in reset
