"""Shared fixtures: a real local Ray instance for the integration tests."""

from __future__ import annotations

import pytest


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
