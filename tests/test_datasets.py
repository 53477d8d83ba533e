"""The data a run used, as its MLflow inputs: digests that change with the data and with how a
run cuts it, row counts, sources the MLflow UI shows."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq

from orchestration.datasets import data_digest, dataset_inputs
from orchestration.preflight import load_experiment
from swav.data import open_source
from test_object_storage import _digits_table


def _parquet(folder, rows: int) -> str:
    folder.mkdir()
    pq.write_table(_digits_table(rows), folder / "part-0.parquet")
    return str(folder)


def _config(*overrides: str):
    return load_experiment(None, list(overrides))


def test_the_digest_follows_the_data_and_the_cut_not_the_folder(tmp_path):
    a = _parquet(tmp_path / "a", 120)
    b = _parquet(tmp_path / "b", 121)  # one more image
    copy = shutil.copytree(a, tmp_path / "copy")
    digest = data_digest(_config("data.source=parquet", f"data.path={a}"))
    assert len(digest) == 16
    assert data_digest(_config("data.source=parquet", f"data.path={copy}")) == digest
    assert data_digest(_config("data.source=parquet", f"data.path={b}")) != digest
    assert data_digest(_config("data.source=parquet", f"data.path={a}", "data.limit=50")) != \
        digest
    assert data_digest(_config("data.source=parquet", f"data.path={a}", "scaling.seed=1")) != \
        digest
    assert data_digest(_config()) == data_digest(_config())  # the embedded digits


def test_a_run_has_a_training_and_an_evaluation_input_with_their_rows(tmp_path):
    path = _parquet(tmp_path / "digits", 100)
    cfg = _config("data.source=parquet", f"data.path={path}", "data.limit=60")
    splits = open_source("parquet", path, seed=0)
    inputs = dataset_inputs(cfg, splits)
    assert [i.tags[0].value for i in inputs] == ["training", "evaluation"]
    assert [json.loads(i.dataset.profile)["num_rows"] for i in inputs] == [60, 20]
    assert {i.dataset.digest for i in inputs} == {data_digest(cfg)}
    assert inputs[0].dataset.name == "parquet:digits (training)"
    assert json.loads(inputs[0].dataset.source)["uri"].endswith("/digits")
    embedded = dataset_inputs(_config(), None)
    assert embedded[0].dataset.source_type == "code"  # (opened here: the driver had not)
    assert json.loads(embedded[0].dataset.profile) == {"num_rows": 1438}  # 80% of 1,797
    named = tmp_path / "named"
    named.mkdir()
    classes = [f"digit {d}" for d in range(10)]
    pq.write_table(_digits_table(40).replace_schema_metadata({"classes": ",".join(classes)}),
                   named / "part-0.parquet")
    cfg = _config("data.source=parquet", f"data.path={named}")
    splits = open_source("parquet", str(named), seed=0)
    profile = json.loads(dataset_inputs(cfg, splits)[1].dataset.profile)  # kept with the data
    assert profile == {"num_rows": 8, "classes": classes}
