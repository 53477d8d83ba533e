"""A private MLflow server over a local SQLite store, for runs that log from many processes.

Concurrent Tune trials each log from their own processes; many writers on one SQLite file give
"database is locked".  ``swav-ray tune`` therefore puts a single-worker ``mlflow server`` on
127.0.0.1 in front of a ``sqlite:///`` store for the sweep's duration: every trial logs over HTTP
and one process writes the file.  Artifacts stay where MLflow puts a SQLite store's artifacts
(``mlruns/`` beside the database, written directly by the clients), so the runs read the same
afterwards with the plain ``sqlite:///`` URI.  Other URIs (an ``http://`` server) pass through.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["serving", "stop_session"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the private MLflow server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"the private MLflow server at {url} did not answer in {timeout:.0f} s")


@contextmanager
def serving(uri: str, timeout: float = 90.0) -> Iterator[str]:
    """Yield a URI many processes can log to at once: ``uri`` itself unless it is SQLite."""
    if not uri.startswith("sqlite:///"):
        yield uri
        return
    db = Path(uri[len("sqlite:///"):])
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--default-artifact-root", str(db.parent / "mlruns"), "--no-serve-artifacts",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = open(db.parent / "mlflow-server.log", "ab")
    # Its own session: the server and its worker are stopped together, by this PID only.
    # MLflow 3's job runner (a runner and seven huey consumers, processes nothing here uses)
    # stays off: on a small machine they compete with the trials for its cores.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True, env=env)
    try:
        _wait_healthy(url, process, timeout)
        yield url
    finally:
        stop_session(process)
        log.close()


def stop_session(process: subprocess.Popen, grace: float = 15.0) -> None:
    """Stop a server started with ``start_new_session=True`` and everything it started (its
    process group, by its PID): SIGTERM, then SIGKILL after ``grace`` seconds."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
