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
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestration.mlflow_server import stop_session

BIN = Path(sys.executable).parent
S3_CLIENT = {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local",
             "AWS_DEFAULT_REGION": "us-east-1"}


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1: every socket stays bound until all are chosen
    (one at a time, the system may hand a closed one out again)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def pids_holding(text: str) -> list[int]:
    """The processes whose command line holds ``text`` (a node's own temp folder)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def children(pid: int) -> list[int]:
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


def kill_tree(pids: list[int]) -> None:
    """SIGKILL ``pids`` and every process they started, as a machine that loses power would."""
    seen, stack = set(), list(pids)
    while stack:
        pid = stack.pop()
        if pid not in seen:
            seen.add(pid)
            stack.extend(children(pid))
    for pid in seen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _wait(ready, process: subprocess.Popen, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.3)


def _answers(url: str) -> bool:
    """Whether a server answers at ``url``: any HTTP response counts (an S3 server that wants
    credentials answers 403)."""
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


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


AGENT_PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
               "runtime-env-agent-port", "metrics-export-port")


def start_ray_node(folder: Path, env: dict[str, str], cpus: int,
                   head: str | None = None) -> dict[str, str]:
    """One Ray node started as ``cluster.yaml``'s commands start one (``ray start``), on
    127.0.0.1 with its own temp folder and free ports (the defaults would collide between
    nodes on one machine): a head when ``head`` is None, else a node joining that GCS address.
    Returns the head's addresses (GCS and dashboard), or {} for a worker node."""
    ports = free_ports(len(AGENT_PORTS) + 3)
    flags = [f"--{flag}={port}" for flag, port in zip(AGENT_PORTS, ports)]
    if head is None:
        gcs, dashboard, client = ports[len(AGENT_PORTS):]
        flags += ["--head", f"--port={gcs}", "--include-dashboard=true",
                  "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                  f"--ray-client-server-port={client}"]
    else:
        flags.append(f"--address={head}")
    subprocess.run([str(BIN / "ray"), "start", f"--temp-dir={folder}", "--node-ip-address=127.0.0.1",
                    f"--num-cpus={cpus}", "--num-gpus=0", "--disable-usage-stats", *flags],
                   check=True, env=env, capture_output=True, text=True, timeout=180)
    if head is not None:
        return {}
    return {"RAY_ADDRESS": f"127.0.0.1:{gcs}",
            "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard}"}


def stop_ray_node(folder: Path) -> None:
    """End one node by PID: every process whose command line holds its temp folder, and their
    children (its raylet, agents and workers), at once, as when a machine is lost."""
    kill_tree(pids_holding(str(folder)))


@contextlib.contextmanager
def s3_server(folder: Path, port: int | None = None, **env: str) -> Iterator[str]:
    """moto's S3-compatible server on ``port`` (default: a free one) of 127.0.0.1 (``env``: its
    settings; its state in memory: gone when the server stops); yields its endpoint URL."""
    port = port or free_port()
    with _process([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                  folder / f"s3-{port}.log", {**os.environ, **env}) as server:
        endpoint = f"http://127.0.0.1:{port}"
        _wait(lambda: _answers(endpoint), server, "the S3 server")
        yield endpoint


@contextlib.contextmanager
def local_cluster(folder: Path, worker_nodes: int = 2, cpus_per_node: int = 1,
                  bucket: str = "swav", s3: str | None = None) -> Iterator[dict[str, str]]:
    """Everything above, its logs in ``folder`` (``s3``: the endpoint of an S3 server already
    running, instead of starting one); yields the environment a client needs, and
    ``SWAV_RAY_NODES``: the worker nodes' temp folders (``stop_ray_node`` ends one)."""
    import pyarrow.fs as pafs

    with contextlib.ExitStack() as stack:
        endpoint = s3 or stack.enter_context(s3_server(folder))
        # Token authentication, as Ray turns it on for new clusters; the token is this
        # cluster's own (~/.ray/auth_token is left alone).
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
               "AWS_ENDPOINT_URL": endpoint, **S3_CLIENT, "RAY_AUTH_MODE": "token",
               "RAY_AUTH_TOKEN": secrets.token_hex(32), "PATH": f"{BIN}:{os.environ['PATH']}"}
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

        # Ray's socket paths are limited to ~107 characters: the nodes' folders are short.
        ray_root = Path(tempfile.mkdtemp(prefix="swr-", dir="/tmp"))
        stack.callback(shutil.rmtree, ray_root, ignore_errors=True)
        stack.callback(stop_ray_node, ray_root)
        head = start_ray_node(ray_root / "head", env, cpus=0)  # workers on worker nodes alone
        nodes = [ray_root / f"node-{chr(ord('a') + i)}" for i in range(worker_nodes)]
        for node in nodes:
            start_ray_node(node, env, cpus_per_node, head=head["RAY_ADDRESS"])
        yield {**head, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": env["RAY_AUTH_TOKEN"],
               "AWS_ENDPOINT_URL": endpoint, **S3_CLIENT, "MLFLOW_TRACKING_URI": tracking, "SWAV_RAY_BUCKET": bucket,
               "SWAV_RAY_NODES": ",".join(map(str, nodes))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker-nodes", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=1, help="CPUs of each worker node")
    parser.add_argument("--until-stdin-closes", action="store_true")
    args = parser.parse_args()
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
