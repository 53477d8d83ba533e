"""The typed config tree: YAML + dotted overrides, type checks, validation naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestration.config import (
    EXPERIMENTS_DIR,
    ConfigError,
    ExperimentConfig,
    from_dict,
    parse_overrides,
    resolve_path,
)
from orchestration.preflight import load_experiment


def test_default_experiment_is_the_embedded_digits_run():
    cfg = load_experiment()
    assert cfg.data.source == "digits" and cfg.model.backbone == "convnet"
    assert cfg.scaling.num_workers == 2 and not cfg.scaling.use_gpu


def test_overrides_are_parsed_as_yaml_and_typed():
    cfg = load_experiment(None, ["optim.lr=0.5", "model.n_prototypes=[30, 10]", "optim.epochs=3",
                             "data.limit=100", "scaling.run_name=abc"])
    assert cfg.optim.lr == 0.5 and cfg.model.n_prototypes == [30, 10]
    assert cfg.optim.epochs == 3 and cfg.data.limit == 100 and cfg.scaling.run_name == "abc"
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_ints_are_accepted_for_floats_but_not_the_reverse():
    assert load_experiment(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match="^optim.epochs: expected int, got 1.5"):
        load_experiment(None, ["optim.epochs=1.5"])
    with pytest.raises(ConfigError, match="^scaling.use_gpu: expected bool"):
        load_experiment(None, ["scaling.use_gpu=1"])


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    """PyYAML reads ``1e-4`` as a string (YAML 1.1 needs ``1.0e-4``); a float field takes it."""
    assert load_experiment(None, ["optim.weight_decay=1e-4"]).optim.weight_decay == 1e-4
    path = tmp_path / "x.yaml"
    path.write_text("optim:\n  weight_decay: 5E-6\n  lr: 2e+1\n")
    cfg = load_experiment(str(path))
    assert cfg.optim.weight_decay == 5e-6 and cfg.optim.lr == 20.0
    with pytest.raises(ConfigError, match="^optim.lr: expected float, got 'fast'"):
        load_experiment(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="^optim.epochs: expected int, got '1e3'"):
        load_experiment(None, ["optim.epochs=1e3"])


def test_round_trip_through_a_dict_and_flat_params():
    cfg = load_experiment(None, ["swav.queue_length=128"])
    assert from_dict(cfg.to_dict()) == cfg
    flat = cfg.flat()
    assert flat["swav.queue_length"] == 128
    assert len(flat) == sum(len(v) if isinstance(v, dict) else 1 for v in cfg.to_dict().values())


@pytest.mark.parametrize(
    "override,message",
    [
        ("nope.x=1", "nope: unknown key"),
        ("optim.learning_rate=1", "optim.learning_rate: unknown key"),
        ("swav.epsilon=0", "swav.epsilon: must be > 0"),
        ("swav.epsilon=-0.1", "swav.epsilon: must be > 0"),
        ("crops.crops_for_assign=[0, 7]", "crops.crops_for_assign: [7] out of range"),
        ("crops.size_crops=[16]", "crops.size_crops: has 1 entries but nmb_crops has 2"),
        ("crops.min_scale_crops=[0.6, 0.9]", "crops.min_scale_crops"),
        ("crops.solarize_prob=2", "crops.solarize_prob: must be a probability in [0, 1], got 2.0"),
        ("model.n_prototypes=0", "model.n_prototypes: every K must be an int >= 1"),
        ("model.n_prototypes=[10, 0]", "model.n_prototypes"),
        ("model.backbone=vgg16", "model.backbone: unknown backbone 'vgg16'"),
        ("swav.queue_length=-64", "swav.queue_length: must be >= 0"),
        ("optim.name=adam", "optim.name: unknown optimizer 'adam'"),
        ("optim.warmup_epochs=50", "optim.warmup_epochs: must be in [0, optim.epochs=32]"),
        ("optim.time_budget_s=0", "optim.time_budget_s: must be > 0 seconds or null, got 0.0"),
        ("optim.time_budget_s=soon", "optim.time_budget_s: expected float or null, got 'soon'"),
        ("data.source=mnist", "data.source: unknown source 'mnist'"),
        ("data.source=imagefolder", "data.path: required for source 'imagefolder'"),
        ("scaling.num_workers=0", "scaling.num_workers: must be >= 1"),
        ("eval.knn_k=0", "eval.knn_k: must be >= 1"),
    ],
)
def test_bad_values_name_their_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_experiment(None, [override])
    assert str(err.value).startswith(message)


def test_shipped_experiment_files_are_valid(tmp_path):
    names = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml") if not p.stem.startswith("sweep_"))
    assert {"default", "cifar10_resnet18", "stanford_dogs_resnet50", "imagenet_resnet50"} <= set(names)
    for name in names:
        cfg = load_experiment(name, [f"data.path={tmp_path}"])
        assert isinstance(cfg, ExperimentConfig)
    paper = load_experiment("imagenet_resnet50", [f"data.path={tmp_path}"])
    assert (paper.crops.nmb_crops, paper.crops.size_crops) == ([2, 6], [224, 96])
    assert paper.model.n_prototypes == 3000 and paper.optim.name == "lars"
    assert paper.optim.batch_size * paper.scaling.num_workers == 4096
    assert paper.swav.queue_length == 3840 and paper.optim.epochs == 800


def test_a_packaged_experiment_is_found_by_name_or_as_the_readme_writes_it_from_anywhere(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout: no experiments/ here
    for config in ("cifar10_wallclock", "experiments/cifar10_wallclock.yaml"):
        assert resolve_path(config) == EXPERIMENTS_DIR / "cifar10_wallclock.yaml"
    with pytest.raises(ConfigError, match="^config: no such experiment file "
                                          "'experiments/cifar10_walclock.yaml' "):
        resolve_path("experiments/cifar10_walclock.yaml")
    own = tmp_path / "experiments" / "cifar10_wallclock.yaml"  # a file of the user's own wins
    own.parent.mkdir()
    own.write_text("optim:\n  epochs: 3\n")
    assert resolve_path("experiments/cifar10_wallclock.yaml") == Path(
        "experiments/cifar10_wallclock.yaml")


def test_missing_or_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="^config: no such experiment file .*missing.yaml' "
                                          r"\(by name: cifar10_resnet18, cifar10_wallclock, "
                                          "default, .*sweep_default\\)$"):
        load_experiment(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed")
    with pytest.raises(ConfigError, match="^config: .* is not valid YAML"):
        load_experiment(bad)
    with pytest.raises(ConfigError, match="overrides are dotted key=value"):
        load_experiment(None, ["optim.lr"])


def test_a_resume_may_change_only_the_keys_that_do_not_change_the_experiment():
    from orchestration.config import resume_changes

    stored = load_experiment(None, ["data.source=digits"]).to_dict()
    same = load_experiment(None, ["optim.epochs=64", "eval.knn_every=2",
                              "scaling.max_failures=0"]).to_dict()
    refused, allowed = resume_changes(stored, same)
    assert refused == []
    assert allowed == ["eval.knn_every: 1 -> 2", "optim.epochs: 32 -> 64",
                       "scaling.max_failures: 2 -> 0"]
    other = load_experiment(None, ["model.n_prototypes=30", "optim.lr=0.1"]).to_dict()
    refused, _ = resume_changes(stored, other)
    assert refused == ["model.n_prototypes: 100 -> 30", "optim.lr: 0.004 -> 0.1"]
    stored["data"]["gone"] = 1  # a key of an older version: a difference, not a crash
    assert resume_changes(stored, same)[0] == ["data.gone: 1 -> '(absent)'"]
    del stored["data"]["gone"]
    # A key newer than the stored config was its default there: no change unless set.
    del stored["model"]["init"], stored["data"]["class_names"]
    assert resume_changes(stored, same)[0] == []
    init = load_experiment(None, ["optim.epochs=64", "model.init=w.pt"]).to_dict()
    assert resume_changes(stored, init)[0] == ["model.init: None -> 'w.pt'"]


def test_a_config_stored_by_an_earlier_version_with_a_retired_key_still_loads_and_resumes():
    """Runs logged before the test-only ``fail_at_epoch`` left the schema hold it in their
    config.yaml: evaluate (from_dict) and a resume (resume_changes) ignore it."""
    from orchestration.config import resume_changes

    stored = {**load_experiment(None).to_dict(), "fail_at_epoch": None}
    assert from_dict(stored) == load_experiment(None)
    assert resume_changes(stored, load_experiment(None).to_dict()) == ([], [])
    with pytest.raises(ConfigError, match="^fail_at_epoch: unknown key"):
        load_experiment(None, ["fail_at_epoch=3"])  # not a user's key any more
