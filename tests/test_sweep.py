"""Sweep files: the search space over dotted config keys, trial configs, and every bad input as
one line naming the problem before Ray starts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from orchestration import cli
from orchestration.config import EXPERIMENTS_DIR, ConfigError
from orchestration.sweep import SweepSpec, load_sweep, trial_config

PRESETS = {
    "two": {"nmb_crops": [2], "size_crops": [16], "min_scale_crops": [0.6],
            "max_scale_crops": [1.0], "crops_for_assign": [0, 1]},
    "multi": {"nmb_crops": [2, 2], "size_crops": [16, 10], "min_scale_crops": [0.6, 0.3],
              "max_scale_crops": [1.0, 0.6], "crops_for_assign": [0, 1]},
}


def write(tmp: Path, **sweep) -> str:
    data = {"experiment": "default", "search": {"swav.epsilon": {"grid": [0.03, 0.05]}}, **sweep}
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_shipped_sweeps_load_and_their_trials_are_valid(tmp_path):
    names = sorted(p.stem for p in EXPERIMENTS_DIR.glob("sweep_*.yaml"))
    assert {"sweep_default", "sweep_cifar10", "sweep_cifar10_wallclock"} <= set(names)
    for name in names:
        assert load_sweep(name, [f"data.path={tmp_path}"]).dimensions
    spec = load_sweep("sweep_default")
    assert [d.key for d in spec.dimensions] == ["model.n_prototypes", "swav.epsilon",
                                                "swav.temperature"]
    assert (spec.metric, spec.mode, spec.scheduler["name"]) == ("knn_top1", "max", "asha")
    cfg = trial_config(spec.base, spec.dimensions, {"model.n_prototypes": 30,
                                                     "swav.epsilon": 0.05,
                                                     "swav.temperature": 0.2})
    assert (cfg.model.n_prototypes, cfg.swav.epsilon, cfg.swav.temperature) == (30, 0.05, 0.2)
    assert cfg.optim.epochs == 12 and cfg.model.backbone == "convnet"  # base + its overrides
    assert not cfg.eval.final_evaluation and cfg.eval.explain_images == 0  # trials: no eval
    assert spec.final_evaluation  # the best trial gets it
    timed = load_sweep("sweep_cifar10_wallclock", [f"data.path={tmp_path}"])
    assert timed.base_config().optim.time_budget_s == 120 and timed.scheduler["grace_period"] == 15


def test_a_section_is_searched_as_a_whole_by_named_presets(tmp_path):
    spec = load_sweep(write(tmp_path, search={"crops": {"choice": PRESETS},
                                              "optim.lr": {"loguniform": [1e-3, 1e-2]},
                                              "model.width": {"randint": [8, 17]}}))
    dims = {d.key: d for d in spec.dimensions}
    assert dims["crops"].values == ["two", "multi"] and dims["model.width"].representatives() == [8, 16]
    cfg = trial_config(spec.base, spec.dimensions, {"crops": "multi", "optim.lr": 0.002,
                                                    "model.width": 12})
    assert cfg.crops.nmb_crops == [2, 2] and cfg.crops.size_crops == [16, 10]
    assert cfg.crops.flip_prob == 0.0  # keys the preset leaves out keep the base's value
    assert cfg.optim.lr == 0.002 and cfg.model.width == 12
    again = SweepSpec.from_dict(yaml.safe_load(yaml.safe_dump(spec.to_dict())))
    assert again == spec  # what --resume reads back


@pytest.mark.parametrize("sweep,message", [
    ({"search": {"swav.epsilom": {"grid": [0.1]}}}, "search.swav.epsilom: not a config key"),
    ({"search": {"optim.lr": {"loguniform": [0, 0.1]}}},
     "search.optim.lr: loguniform needs 0 < low, got 0"),
    ({"search": {"optim.lr": {"uniform": [0.1]}}}, "search.optim.lr: uniform needs [low, high]"),
    ({"search": {"optim.lr": {"normal": [0, 1]}}}, "search.optim.lr: unknown distribution 'normal'"),
    ({"search": {"optim.lr": [0.1, 0.2]}}, "search.optim.lr: expected one distribution"),
    ({"search": {"model.width": {"randint": [8.5, 16]}}}, "search.model.width: randint needs integer"),
    ({"search": {"crops": {"choice": [1, 2]}}}, "search.crops: a section is searched as a whole"),
    ({"search": {"crops": {"choice": {"a": {"nmb_crop": [2]}}}}},
     "search.crops: preset key 'nmb_crop' is not in section crops"),
    ({"metric": "accuracy"}, "metric: 'accuracy' is not reported by trials"),
    ({"metric": "setup_s"}, "metric: setup_s is reported once, before training"),
    ({"mode": "best"}, "mode: expected min or max"),
    ({"search": {"swav.epsilon": {"grid": [0.05, 0.0]}}},
     "search: swav.epsilon=0.0 makes an invalid config: swav.epsilon: must be > 0"),
    ({"search": {"crops.nmb_crops": {"grid": [[2, 6], [2]]}}},
     "search: crops.nmb_crops=[2] makes an invalid config: crops."),
    ({"overrides": {"eval.knn_every": 2}}, "metric: ASHA compares knn_top1 every epoch"),
    ({"scheduler": {"name": "hyperband"}}, "scheduler.name: expected one of asha, fifo"),
    ({"scheduler": {"name": "asha", "grace": 2}}, "scheduler.grace: unknown for asha"),
    ({"searcher": "grid", "search": {"optim.lr": {"uniform": [0.001, 0.002]}}},
     "search.optim.lr: the grid searcher takes grid or choice only"),
    ({"num_samples": 0}, "num_samples: must be an integer >= 1"),
    ({"trials": 3}, "trials: unknown sweep key"),
    ({"overrides": {"optim.lrr": 0.1}}, "optim.lrr: unknown key"),
])
def test_bad_sweeps_are_one_line_naming_the_problem(tmp_path, sweep, message):
    with pytest.raises(ConfigError) as err:
        load_sweep(write(tmp_path, **sweep))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_an_experiment_given_as_a_sweep_is_named_as_such():
    with pytest.raises(ConfigError, match=r"^sweep: .*experiments/default.yaml is an experiment, "
                                          r"not a sweep \(a sweep names its experiment and a "
                                          r"'search' section: e.g. sweep_default\)$"):
        load_sweep("default")


def test_an_unlabelled_source_cannot_be_swept_on_knn(tmp_path):
    (tmp_path / "data.parquet").write_bytes(b"")
    path = write(tmp_path, overrides={"data.source": "parquet", "data.label_column": None,
                                      "data.path": str(tmp_path / "data.parquet")})
    with pytest.raises(ConfigError, match="^metric: knn_top1 needs labels"):
        load_sweep(path)
    path = write(tmp_path, metric="loss", overrides={
        "data.source": "parquet", "data.label_column": None,
        "data.path": str(tmp_path / "data.parquet")})
    assert load_sweep(path).mode == "min"


def test_the_cli_rejects_a_bad_sweep_with_exit_code_2_before_ray_starts(tmp_path, capsys,
                                                                       monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for bad input")

    monkeypatch.setattr(cli, "connect_ray", no_ray)
    path = write(tmp_path, search={"swav.epsilom": {"grid": [0.1]}})
    assert cli.main(["tune", path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("swav-ray: error: search.swav.epsilom: not a config key")
    assert len(err.splitlines()) == 1
    assert cli.main(["tune", "--resume", "no-such-sweep", "--storage", str(tmp_path)]) == 2
    assert "resume: no sweep 'no-such-sweep'" in capsys.readouterr().err
    path = write(tmp_path, overrides={"optim.batch_size": 4096})  # the base's data, checked
    assert cli.main(["tune", path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("swav-ray: error: optim.batch_size: 4096 images per step exceed the ")
    assert len(err.splitlines()) == 1
    path = write(tmp_path, overrides={"scaling.storage_path": "/proc/swav-ray-sweeps"})
    assert cli.main(["tune", path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("swav-ray: error: scaling.storage_path: /proc/swav-ray-sweeps is not "
                          "writable") and len(err.splitlines()) == 1
    assert cli.main(["train", "sweep_default"]) == 2
    assert "is a sweep file; run it with swav-ray tune" in capsys.readouterr().err


def test_a_sweep_is_named_after_its_file_without_doubling_sweep():
    from orchestration.tuning import default_sweep_name

    assert re.fullmatch(r"sweep-default-\d{8}-\d{6}",
                        default_sweep_name("experiments/sweep_default.yaml"))
    assert re.fullmatch(r"sweep-mine-\d{8}-\d{6}", default_sweep_name("/tmp/mine.yaml"))
