"""The cluster path on one machine (scripts/local_cluster.py): a head and two worker nodes on
127.0.0.1, an S3-compatible server, an MLflow server with its artifacts in S3; ``swav-ray train``
joins through a loopback RAY_ADDRESS as a user's shell would."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from test_object_storage import _digits_table

ROOT = Path(__file__).resolve().parents[1]
SWAV_RAY = str(Path(sys.executable).parent / "swav-ray")
TINY = ["optim.batch_size=32", "model.width=8", "model.hidden_dim=32", "model.out_dim=16",
        "model.n_prototypes=20", "swav.freeze_prototypes_iters=2", "eval.knn_k=10",
        "optim.warmup_epochs=1", "eval.final_evaluation=false", "eval.explain_images=0"]


def _script():
    spec = importlib.util.spec_from_file_location("local_cluster",
                                                  ROOT / "scripts" / "local_cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.slow
def test_two_nodes_train_from_s3_into_s3_resume_from_it_and_evaluate_elsewhere(tmp_path,
                                                                              monkeypatch):
    """Two workers, one on each worker node (tag ``ray_nodes``), read their Parquet shards from
    the bucket and write checkpoints to it; the run names its last checkpoint as ``s3://``; the
    same run name resumes from the bucket (a longer schedule, every epoch logged once); the
    model, the figures and the weights are MLflow artifacts in the bucket; and the run
    evaluates from a folder that never saw it. Nothing lands on the local disk."""
    from orchestration.evaluate import evaluate_run

    with _script().local_cluster(tmp_path) as cluster:
        bucket, tracking = cluster["SWAV_RAY_BUCKET"], cluster["MLFLOW_TRACKING_URI"]
        fs = pafs.S3FileSystem(endpoint_override=cluster["AWS_ENDPOINT_URL"],
                               access_key="local", secret_key="local")
        table = _digits_table(300)
        for key, part in (("split/train.parquet", table.slice(0, 240)),
                          ("split/test.parquet", table.slice(240))):
            with fs.open_output_stream(f"{bucket}/{key}") as out:
                pq.write_table(part, out, row_group_size=40)
        env = {**{k: v for k, v in os.environ.items()
                  if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "MLFLOW_TRACKING_URI")},
               **cluster}
        command = [SWAV_RAY, "train", *TINY, "data.source=parquet",
                   f"data.path=s3://{bucket}/split/", f"scaling.storage_path=s3://{bucket}/runs",
                   "scaling.run_name=spread", f"tracking.tracking_uri={tracking}"]
        work = tmp_path / "work"
        work.mkdir()
        for epochs in (2, 3):
            result = subprocess.run([*command, f"optim.epochs={epochs}"], cwd=work, env=env,
                                    capture_output=True, text=True, timeout=400)
            assert result.returncode == 0, result.stderr[-3000:]
            last = f"s3://{bucket}/runs/spread/checkpoint_epoch00000{epochs - 1}"
            assert f"checkpoint: {last}" in result.stdout, result.stdout
        assert "(resumed)" in result.stdout
        client = MlflowClient(tracking)
        (run,) = client.search_runs([client.get_experiment_by_name("swav-ray").experiment_id])
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1, 2]
        assert len(run.data.tags["ray_nodes"].split(",")) == 2  # a worker on each worker node
        objects = [i.path for i in fs.get_file_info(pafs.FileSelector(bucket, recursive=True))]
        for name in ("runs/spread/checkpoint_epoch000002/state.pt", "runs/spread/mlflow_run_id",
                     f"{run.info.run_id}/artifacts/checkpoints/state.pt",
                     f"{run.info.run_id}/artifacts/augmentations/multicrop.png"):
            assert any(p.endswith(name) for p in objects), (name, objects)
        assert any("/models/" in p and p.endswith("/artifacts/MLmodel") for p in objects)
        assert list(work.iterdir()) == []

        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        for key, value in cluster.items():
            monkeypatch.setenv(key, value)
        metrics = evaluate_run(run.info.run_id, tracking, "cpu")
        assert 0 < metrics["eval_knn_top1"] <= 1 and list(elsewhere.iterdir()) == []
        assert any(i.path.endswith(f"{run.info.run_id}/artifacts/evaluation/embedding.png")
                   for i in fs.get_file_info(pafs.FileSelector(bucket, recursive=True)))
