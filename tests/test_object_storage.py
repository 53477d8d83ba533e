"""Data in object storage: Parquet under ``s3://`` read through pyarrow's file systems, against a
real S3-compatible server on 127.0.0.1 (tests/conftest.py's ``s3_server``)."""

from __future__ import annotations

import io
import secrets
import socket

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from orchestration import cli
from swav.data import ParquetImageDataset, load_digits_arrays, open_source


def _digits_table(rows: int) -> pa.Table:
    images, labels = load_digits_arrays()
    blobs = []
    for image in images[:rows]:
        buf = io.BytesIO()
        Image.fromarray(image).convert("RGB").save(buf, format="PNG")
        blobs.append(buf.getvalue())
    return pa.table({"image": pa.array(blobs, pa.binary()), "label": labels[:rows].tolist()})


@pytest.fixture
def bucket(s3_env) -> str:
    """A new bucket with the first 300 digits in two Parquet files (row groups of 40) under
    ``digits/``, the same under ``split/train.parquet`` + ``split/test.parquet``, and a prefix
    ``notes/`` holding no Parquet."""
    name = f"swav-{secrets.token_hex(4)}"
    fs = pafs.S3FileSystem(endpoint_override=s3_env, allow_bucket_creation=True)
    fs.create_dir(name)
    table = _digits_table(300)
    for key, part in (("digits/a.parquet", table.slice(0, 160)),
                      ("digits/b.parquet", table.slice(160)),
                      ("split/train.parquet", table.slice(0, 240)),
                      ("split/test.parquet", table.slice(240))):
        with fs.open_output_stream(f"{name}/{key}") as out:
            pq.write_table(part, out, row_group_size=40)
    with fs.open_output_stream(f"{name}/notes/readme.txt") as out:
        out.write(b"no images here")
    return name


def test_parquet_in_a_bucket_reads_as_a_local_copy_and_a_shard_reads_only_its_row_groups(
        bucket, tmp_path):
    table = _digits_table(300)
    pq.write_table(table.slice(0, 160), tmp_path / "a.parquet", row_group_size=40)
    pq.write_table(table.slice(160), tmp_path / "b.parquet", row_group_size=40)
    remote = open_source("parquet", f"s3://{bucket}/digits/", seed=3)
    local = open_source("parquet", str(tmp_path), seed=3)
    assert len(remote.train) == len(local.train) == 240 and remote.n_classes == local.n_classes
    for i in (0, 7, 239):
        (a, la), (b, lb) = remote.train[i], local.train[i]
        assert la == lb and np.array_equal(np.asarray(a), np.asarray(b))
    # A worker's shard (rows 80..119 of the whole) touches one row group of one file.
    shard = ParquetImageDataset(f"s3://{bucket}/digits/").restrict(range(80, 120))
    shard.load()
    assert sorted(shard._cache) == list(range(80, 120))
    assert shard.files == [f"{bucket}/digits/a.parquet", f"{bucket}/digits/b.parquet"]


def test_a_train_and_test_layout_in_a_bucket_is_its_held_out_split(bucket):
    splits = open_source("parquet", f"s3://{bucket}/split")
    assert (len(splits.train), len(splits.heldout)) == (240, 60)


@pytest.mark.parametrize("path, says", [
    ("s3://{bucket}-gone/digits/", "data.path: bucket '{bucket}-gone' does not exist"),
    ("s3://{bucket}/nothing/", "data.path: no .parquet files under 's3://{bucket}/nothing/'"),
    ("s3://{bucket}/notes/", "data.path: no .parquet files under 's3://{bucket}/notes/'"),
])
def test_a_bad_object_storage_path_is_one_line_before_ray_starts(bucket, path, says, capsys,
                                                                 tmp_path, monkeypatch):
    import ray

    monkeypatch.chdir(tmp_path)
    code = cli.main(["train", "data.source=parquet", f"data.path={path.format(bucket=bucket)}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not ray.is_initialized()
    assert err.startswith(f"swav-ray: error: {says.format(bucket=bucket)}") and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run, no store


def test_images_in_object_storage_are_parquet_only(s3_env, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "data.source=imagefolder", "data.path=s3://bucket/images/"]) == 2
    assert capsys.readouterr().err.strip() == (
        "swav-ray: error: data.path: source 'imagefolder' reads a local folder; keep images in "
        "object storage as Parquet (data.source=parquet)")


def test_refused_credentials_are_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    """A server that checks credentials (moto with authentication on) refuses unknown keys."""
    from conftest import moto_server

    with moto_server(tmp_path, INITIAL_NO_AUTH_ACTION_COUNT="0") as url:
        for key, value in (("AWS_ENDPOINT_URL", url), ("AWS_ACCESS_KEY_ID", "nobody"),
                           ("AWS_SECRET_ACCESS_KEY", "wrong"), ("AWS_DEFAULT_REGION", "us-east-1")):
            monkeypatch.setenv(key, value)
        monkeypatch.chdir(tmp_path)
        assert cli.main(["train", "data.source=parquet", "data.path=s3://swav/digits/"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("swav-ray: error: data.path: cannot read 's3://swav/digits/' (") \
        and "ACCESS_DENIED" in err and "\n" not in err


TINY = ["optim.batch_size=32", "model.width=8", "model.hidden_dim=32", "model.out_dim=16",
        "model.n_prototypes=20", "swav.freeze_prototypes_iters=2", "eval.knn_k=10",
        "optim.warmup_epochs=1", "eval.final_evaluation=false", "eval.explain_images=0"]


@pytest.fixture
def mlflow_s3(bucket, tmp_path):
    """``mlflow server`` as cluster.yaml starts it: a SQLite store, artifacts proxied to the
    bucket's ``mlflow/`` prefix; its URL. Stopped by its PID."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "mlflow-server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", f"s3://{bucket}/mlflow", "--workers", "1"],
        stdout=log, stderr=log, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, \
                    (tmp_path / "mlflow-server.log").read_text()[-2000:]
                time.sleep(0.3)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_data_checkpoints_and_artifacts_in_a_bucket_resume_and_evaluate_elsewhere(
        ray_local, bucket, s3_env, mlflow_s3, tmp_path, monkeypatch):
    """Data and checkpoints in S3, MLflow's artifacts in S3 through a server as cluster.yaml
    starts it: the checkpoints are objects in the bucket and the run names its last one as
    ``s3://``; the same run name resumes from the bucket (a longer schedule, every epoch logged
    once); the model, the figures and the weights are objects in the bucket; and the run
    evaluates from a folder that never saw it."""
    from mlflow.tracking import MlflowClient

    from orchestration.evaluate import evaluate_run
    from orchestration.preflight import load_experiment
    from orchestration.train import run_training

    uri = mlflow_s3
    overrides = [*TINY, "data.source=parquet", f"data.path=s3://{bucket}/split/",
                 f"scaling.storage_path=s3://{bucket}/runs", "scaling.run_name=remote",
                 f"tracking.tracking_uri={uri}"]
    first = run_training(load_experiment(None, [*overrides, "optim.epochs=2"]))
    assert first.checkpoint_path == f"s3://{bucket}/runs/remote/checkpoint_epoch000001"
    fs = pafs.S3FileSystem(endpoint_override=s3_env)
    stored = {i.path.split("/remote/")[1] for i in fs.get_file_info(
        pafs.FileSelector(f"{bucket}/runs/remote", recursive=True)) if i.type == pafs.FileType.File}
    assert {"mlflow_run_id", "checkpoint_epoch000000/state.pt",
            "checkpoint_epoch000001/state.pt"} <= stored, stored

    again = run_training(load_experiment(None, [*overrides, "optim.epochs=3"]))
    assert again.run_id == first.run_id
    assert again.checkpoint_path == f"s3://{bucket}/runs/remote/checkpoint_epoch000002"
    client = MlflowClient(uri)
    assert client.get_run(again.run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(again.run_id, "loss")] == [0, 1, 2]
    assert client.get_run(again.run_id).data.tags["ray_checkpoint"] == again.checkpoint_path

    objects = [i.path for i in fs.get_file_info(
        pafs.FileSelector(f"{bucket}/mlflow", recursive=True)) if i.type == pafs.FileType.File]
    of_run = {p.split(f"/{again.run_id}/artifacts/", 1)[1] for p in objects
              if f"/{again.run_id}/artifacts/" in p}
    assert {"config.yaml", "checkpoints/state.pt", "augmentations/multicrop.png"} <= of_run, objects
    assert any("/models/" in p and p.endswith("/artifacts/MLmodel") for p in objects), objects

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    metrics = evaluate_run(again.run_id, uri, "cpu")
    assert 0 < metrics["eval_knn_top1"] <= 1 and list(elsewhere.iterdir()) == []
    assert fs.get_file_info(f"{bucket}/mlflow").type == pafs.FileType.Directory
    assert any(i.path.endswith(f"/{again.run_id}/artifacts/evaluation/embedding.png") for i in
               fs.get_file_info(pafs.FileSelector(f"{bucket}/mlflow", recursive=True)))
