"""`ray job submit -- swav-ray train ...` against a real `ray start --head` on 127.0.0.1.

The head gets its own --temp-dir and free ports; it is ended by killing exactly the processes
whose command line holds that temp dir (and their children), never machine-wide.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow  # Ray Train/Tune runs end to end (CI runs them all)

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_holding(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _kill_tree(pids: list[int]) -> None:
    seen, stack = set(), list(pids)
    while stack:
        pid = stack.pop()
        if pid not in seen:
            seen.add(pid)
            stack.extend(_children(pid))
    for pid in seen:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="swr-", dir="/tmp")  # short: Ray's socket paths are limited
    port, dashboard = _free_port(), _free_port()
    # Token authentication (on by default for new clusters since Ray 2.60): a token of our own,
    # given to the head and to the job client alike; ~/.ray/auth_token is left alone.
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    subprocess.run(
        [str(BIN / "ray"), "start", "--head", f"--temp-dir={temp_dir}", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", "--num-cpus=3", "--num-gpus=0",
         "--include-dashboard=true", "--disable-usage-stats"],
        check=True, env=env, capture_output=True, timeout=180,
    )
    try:
        env["SWAV_TEST_GCS"] = f"127.0.0.1:{port}"
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        _kill_tree(_pids_holding(temp_dir))


def test_ray_job_submit_runs_swav_ray_train_on_the_cluster(ray_head, tmp_path):
    address, env = ray_head
    db = tmp_path / "mlflow.db"
    command = [
        str(BIN / "ray"), "job", "submit", "--address", address, "--",
        "swav-ray", "train", "optim.epochs=2", "data.limit=128", "optim.batch_size=32",
        "model.width=8", "model.n_prototypes=20", "eval.knn_k=10",
        f"scaling.storage_path={tmp_path / 'runs'}", f"tracking.tracking_uri=sqlite:///{db}",
    ]
    started = time.time()
    for _ in range(12):  # the head's job agent registers a few seconds after `ray start` returns
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        output = result.stdout + result.stderr
        if "No available agent to submit job" not in output:
            break
        time.sleep(5)
    assert result.returncode == 0, output[-3000:]
    assert "succeeded" in output.lower()
    match = re.search(r"MLflow run id: ([0-9a-f]{32})", output)
    assert match, output[-3000:]
    client = MlflowClient(f"sqlite:///{db}")
    run = client.get_run(match.group(1))
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1]
    # Named <experiment>-<timestamp>-<id>, tagged with what the command was given.
    assert re.fullmatch(r"default-\d{8}-\d{6}-[0-9a-f]{6}", run.info.run_name), run.info.run_name
    assert run.data.tags["swav_ray.experiment_file"] == "(embedded default)"
    assert run.data.tags["swav_ray.overrides"].startswith("optim.epochs=2 data.limit=128 ")
    assert time.time() - started < 600


def test_joining_a_token_cluster_without_its_token_says_how_to_pass_it(ray_head, tmp_path):
    _, env = ray_head
    bare = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    bare.update(RAY_ADDRESS=env["SWAV_TEST_GCS"], HOME=str(tmp_path))  # no ~/.ray/auth_token
    result = subprocess.run([str(BIN / "swav-ray"), "train", "optim.epochs=1"], env=bare,
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2, result.stderr[-2000:]
    assert last.startswith("swav-ray: error: RAY_ADDRESS: the cluster at 127.0.0.1:") and \
        "RAY_AUTH_TOKEN" in last and "get-auth-token" in last, last
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()
