"""Data in object storage: Parquet under ``s3://`` read through pyarrow's file systems, against a
real S3-compatible server on 127.0.0.1 (tests/conftest.py's ``s3_server``)."""

from __future__ import annotations

import io
import secrets

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


def test_a_run_in_a_bucket_names_its_mlflow_run_there_and_the_same_name_resumes_it(
        bucket, tmp_path):
    """The run's MLflow id is an object beside its checkpoints, so a resume from any machine
    continues the same MLflow run; a resume under another config is refused by reading it."""
    from orchestration.config import ConfigError
    from orchestration.preflight import check_resumable, load_experiment
    from orchestration.tracking import TrackedRun

    def config(*extra: str):
        return load_experiment(None, [f"scaling.storage_path=s3://{bucket}/runs",
                                      f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                                      *extra])

    run_dir = f"s3://{bucket}/runs/again"
    first = TrackedRun.start(config(), run_dir, "again")
    first.end("FAILED")
    again = TrackedRun.start(config(), run_dir, "again")
    assert (again.resumed, again.run_id) == (True, first.run_id)
    assert again.client.get_run(again.run_id).info.status == "RUNNING"
    again.end("FINISHED")
    with pytest.raises(ConfigError, match="model.n_prototypes: 100 -> 30"):
        check_resumable(config("model.n_prototypes=30"), run_dir, "again")
    assert not list(tmp_path.glob("runs"))
