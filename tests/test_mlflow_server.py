"""The private MLflow server a sweep puts in front of a SQLite store (its use by whole sweeps:
tests/test_tuning.py)."""

from __future__ import annotations

import urllib.request

import psutil
import pytest

from orchestration.mlflow_server import serving

pytestmark = pytest.mark.slow  # a real server process (about 10 s to start on 2 cores)


def test_the_private_server_answers_on_loopback_and_runs_no_job_runner(tmp_path):
    """MLflow 3 starts a job runner and seven huey consumers with every server by default:
    processes nothing here uses, competing with the trials for a small machine's cores."""
    with serving(f"sqlite:///{tmp_path / 'mlflow.db'}") as url:
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
            assert answer.status == 200
        commands = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
        assert any("mlflow server" in c for c in commands), commands
        assert not any("huey" in c or "_job_runner" in c for c in commands), commands
    assert not [p for p in psutil.Process().children(recursive=True)
                if "mlflow" in " ".join(p.cmdline())]  # stopped with the sweep
