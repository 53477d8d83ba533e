"""The cluster path on one machine, to rehearse it before paying for a cluster.

Starts, all on 127.0.0.1: an S3-compatible server (moto's, ``pip install -e '.[dev]'``) with a
bucket, a Ray cluster of a head and worker nodes (each node its own processes and temp folder:
nothing passes between workers through a shared disk), and an MLflow server that keeps its
artifacts in the bucket, as ``cluster.yaml`` starts it. Prints the environment a shell needs to
use them (``RAY_ADDRESS``, the AWS variables, the tracking URI) and waits; Ctrl-C (or closing its
standard input with ``--until-stdin-closes``) stops everything it started, by PID.

    python scripts/local_cluster.py            # then, in another shell, the printed exports and
    swav-ray train scaling.storage_path=s3://swav/runs tracking.tracking_uri=$MLFLOW_TRACKING_URI
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestration.mlflow_server import stop_session  # noqa: E402

BIN = Path(sys.executable).parent
S3_CLIENT = {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local",
             "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait(ready, process: subprocess.Popen, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.3)


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _process(command: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """A server in a session of its own, stopped with everything it started."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=out, env=env,
                                   start_new_session=True)
        try:
            yield process
        finally:
            stop_session(process, grace=30)


@contextlib.contextmanager
def local_cluster(folder: Path, worker_nodes: int = 2, cpus_per_node: int = 1,
                  bucket: str = "swav") -> Iterator[dict[str, str]]:
    """Everything above, started in ``folder``; yields the environment a client needs."""
    import pyarrow.fs as pafs

    with contextlib.ExitStack() as stack:
        s3_port = free_port()
        s3 = stack.enter_context(_process(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
            folder / "s3.log", dict(os.environ)))
        endpoint = f"http://127.0.0.1:{s3_port}"
        _wait(lambda: _answers(endpoint), s3, "the S3 server")
        env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, **S3_CLIENT}
        pafs.S3FileSystem(endpoint_override=endpoint, access_key="local", secret_key="local",
                          allow_bucket_creation=True).create_dir(bucket)

        mlflow_port = free_port()
        tracking = f"http://127.0.0.1:{mlflow_port}"
        mlflow = stack.enter_context(_process(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
             str(mlflow_port), "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--artifacts-destination", f"s3://{bucket}/mlflow", "--workers", "1"],
            folder / "mlflow.log", {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}))
        _wait(lambda: _answers(f"{tracking}/health"), mlflow, "the MLflow server")

        ready = folder / "ray.json"
        ray = stack.enter_context(_process(
            [sys.executable, __file__, "--ray-nodes", str(worker_nodes), "--cpus",
             str(cpus_per_node), "--ready-file", str(ready)], folder / "ray.log", env))
        _wait(ready.exists, ray, "the Ray cluster", timeout=180)
        address = json.loads(ready.read_text())["address"]
        yield {"RAY_ADDRESS": address, "AWS_ENDPOINT_URL": endpoint, **S3_CLIENT,
               "MLFLOW_TRACKING_URI": tracking, "SWAV_RAY_BUCKET": bucket}


def _serve_ray_nodes(worker_nodes: int, cpus: int, ready: Path) -> None:
    """The Ray cluster itself (run as a child: its nodes end with it). Every node on
    127.0.0.1; the head holds no CPU, so that workers run on the worker nodes alone."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1"})
    for _ in range(worker_nodes):
        cluster.add_node(num_cpus=cpus, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    ready.write_text(json.dumps({"address": cluster.address}))
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    try:
        while not stop:
            time.sleep(0.5)
    finally:
        cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker-nodes", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=1, help="CPUs of each worker node")
    parser.add_argument("--until-stdin-closes", action="store_true")
    parser.add_argument("--ray-nodes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ready-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ray_nodes is not None:
        _serve_ray_nodes(args.ray_nodes, args.cpus, args.ready_file)
        return
    folder = Path(tempfile.mkdtemp(prefix="swav-ray-local-cluster-"))
    with local_cluster(folder, args.worker_nodes, args.cpus) as env:
        for key, value in env.items():
            print(f"export {key}={value}")
        print(f"# logs under {folder}; Ctrl-C stops the S3 server, the MLflow server and Ray",
              flush=True)
        try:
            if args.until_stdin_closes:
                sys.stdin.read()
            else:
                while True:
                    time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
