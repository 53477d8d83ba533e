"""The checks before Ray starts: one line naming the key, nothing left behind."""

from __future__ import annotations

import pytest

from orchestration.config import ConfigError
from orchestration.preflight import (
    check_components,
    check_data,
    check_storage,
    load_experiment,
)
from swav.data import missing_locally


def test_component_checks_name_the_key_and_build_large_models_without_memory():
    cfg = load_experiment(None)
    cfg.swav.epsilon = 0.0
    with pytest.raises(ConfigError, match="^swav.epsilon: must be > 0"):
        check_components(cfg)
    cfg = load_experiment(None)
    cfg.crops.crops_for_assign = [0, 9]
    with pytest.raises(ConfigError, match="^crops.crops_for_assign"):
        check_components(cfg)
    cfg = load_experiment(None, ["model.backbone=resnet50", "model.n_prototypes=3000"])
    check_components(cfg)  # on the meta device: no weights allocated
    cfg.model.backbone = "resnet7"
    with pytest.raises(ConfigError, match="^model.backbone"):
        check_components(cfg)


def test_on_a_cluster_a_data_path_is_checked_where_the_workers_read_it(tmp_path, monkeypatch):
    overrides = ["data.source=imagefolder", f"data.path={tmp_path / 'on-the-workers'}"]
    with pytest.raises(ConfigError, match="^data.path: '.*on-the-workers' does not exist$"):
        load_experiment(None, overrides)  # a local run reads it here: refused at once
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # a cluster's driver (the head) does not read it
    cfg = load_experiment(None, overrides)
    assert check_data(cfg) is None  # nothing to open here; not an error
    d = cfg.data  # what each worker asks first
    assert missing_locally(d.source, d.path, d.download)
    (tmp_path / "on-the-workers").mkdir()
    assert not missing_locally(d.source, d.path, d.download)


def test_storage_is_tried_for_real_and_left_as_it_was(tmp_path):
    """Missing folders are made for the probe and removed again; an existing one keeps only
    what it had."""
    check_storage(str(tmp_path / "a" / "b" / "runs"))
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "kept").write_text("x")
    check_storage(str(tmp_path / "runs"))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept", "runs"]
    check_storage("s3://bucket/runs")  # the workers' to write


@pytest.mark.parametrize("where, says", [
    ("/proc/swav-ray-runs", "/proc/swav-ray-runs is not writable ("),  # not even for root
    ("file/runs", "is not writable (Not a directory)"),
    ("file", "file is a file, not a directory"),
])
def test_storage_where_no_run_folder_can_be_made_is_one_line(tmp_path, where, says):
    (tmp_path / "file").write_text("x")
    path = where if where.startswith("/") else str(tmp_path / where)
    with pytest.raises(ConfigError, match=r"^scaling.storage_path: ") as err:
        check_storage(path)
    assert says in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
