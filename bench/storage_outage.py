"""What a run does when its S3 storage goes away for a while, on one machine.

The local cluster of scripts/local_cluster.py (a Ray head and two worker nodes, ``ray start``;
an MLflow server) in front of moto's S3 server, and ``swav-ray train`` with its checkpoints in
the bucket. Once the third checkpoint has landed the storage goes away for ``--outage``
seconds, then comes back, its objects intact:
- ``--mode refused``: a TCP gate in front of the server stops listening and drops its
  connections (a server restarting: clients get "connection refused");
- ``--mode hang``: the server process is stopped (SIGSTOP, then SIGCONT; requests hang).
Prints the run's exit code and wall time, its lines that are not epoch lines, and the epochs
MLflow logged.

    python bench/storage_outage.py --mode refused --outage 30
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import local_cluster as lc  # noqa: E402

TINY = ["optim.epochs=12", "optim.batch_size=32", "model.width=8", "model.hidden_dim=32",
        "model.out_dim=16", "model.n_prototypes=20", "eval.final_evaluation=false",
        "eval.explain_images=0"]


class Gate:
    """127.0.0.1:``port`` forwarded to ``target``; ``close()`` refuses connections (and drops
    the open ones) until ``open()``."""

    def __init__(self, port: int, target: int) -> None:
        self.port, self.target, self.server, self.links = port, target, None, []
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.open()

    async def _pipe(self, reader, writer) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _link(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self.links += [writer, up_writer]
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def open(self) -> None:
        self.server = self._call(asyncio.start_server(self._link, "127.0.0.1", self.port))

    def close(self) -> None:
        async def shut():
            self.server.close()
            for writer in self.links:
                writer.transport.abort()
            self.links.clear()
        self._call(shut())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("refused", "hang"), default="refused")
    parser.add_argument("--outage", type=float, default=30.0, help="seconds")
    args = parser.parse_args()
    import pyarrow.fs as pafs

    folder = Path(tempfile.mkdtemp(prefix="swav-ray-outage-"))
    with contextlib.ExitStack() as stack:
        endpoint = stack.enter_context(lc.s3_server(folder))
        moto_port = int(endpoint.rsplit(":", 1)[1])
        gate = Gate(lc.free_port(), moto_port)
        # The cluster's clients reach S3 through the gate; the bench watches it directly.
        cluster = stack.enter_context(lc.local_cluster(
            folder, worker_nodes=2, s3=f"http://127.0.0.1:{gate.port}"))
        fs = pafs.S3FileSystem(endpoint_override=endpoint, access_key="local",
                               secret_key="local")
        env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
               **cluster}
        tracking = cluster["MLFLOW_TRACKING_URI"]
        started = time.monotonic()
        run = subprocess.Popen(
            [str(lc.BIN / "swav-ray"), "train", *TINY, "scaling.storage_path=s3://swav/runs",
             "scaling.run_name=outage", f"tracking.tracking_uri={tracking}"], cwd=folder,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stderr = []
        threading.Thread(target=lambda: stderr.extend(run.stderr), daemon=True).start()
        key = "swav/runs/outage/checkpoint_epoch000002/state.pt"
        while fs.get_file_info(key).type == pafs.FileType.NotFound and run.poll() is None:
            time.sleep(0.2)
        moto = lc.pids_holding(f"-p {moto_port}")
        gate.close() if args.mode == "refused" else [os.kill(p, signal.SIGSTOP) for p in moto]
        print(f"storage gone ({args.mode}) at {time.monotonic() - started:.1f} s", flush=True)
        time.sleep(args.outage)
        gate.open() if args.mode == "refused" else [os.kill(p, signal.SIGCONT) for p in moto]
        print(f"storage back at {time.monotonic() - started:.1f} s", flush=True)
        out = run.stdout.read()
        code = run.wait()
        print(f"exit code {code} after {time.monotonic() - started:.1f} s")
        print("".join(line for line in stderr if not line.startswith("epoch")), end="")
        print(out.strip().splitlines()[-4] if out.strip() else "")
        _report(tracking)


def _report(db: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(db)
    (run,) = client.search_runs([client.get_experiment_by_name("swav-ray").experiment_id])
    losses = [(m.step, round(m.value, 4)) for m in client.get_metric_history(run.info.run_id,
                                                                             "loss")]
    print(f"MLflow run {run.info.status}; loss by epoch: {losses}")


if __name__ == "__main__":
    main()
