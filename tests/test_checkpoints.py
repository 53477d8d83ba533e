"""Checkpoints load without running code, never show half a file, and fall back when unreadable."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestration.checkpoints import (
    STATE_FILE,
    CheckpointError,
    load_state,
    rng_state,
    save_state,
    set_rng_state,
)
from orchestration.preflight import load_experiment
from orchestration.recipe import build_training


class _Planted:
    """What an attacker pickles: unpickling calls os.system (here: touch a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_crafted_checkpoint_cannot_run_code(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / STATE_FILE
    torch.save({"engine": _Planted(marker), "epoch": 3}, path)
    with pytest.raises(CheckpointError, match=f"^checkpoint: cannot load {path}: it holds objects"):
        load_state(path)
    assert not marker.exists()
    with open(path, "wb") as f:  # a plain pickle, not even a torch zip
        pickle.dump(_Planted(marker), f)
    with pytest.raises(CheckpointError, match="^checkpoint: cannot load"):
        load_state(path)
    assert not marker.exists()


def test_a_truncated_or_missing_checkpoint_is_one_line_naming_the_file(tmp_path):
    full = save_state(tmp_path, {"epoch": 2, "w": torch.zeros(1000)}).read_bytes()
    (tmp_path / STATE_FILE).write_bytes(full[: len(full) // 2])
    for path in (tmp_path / STATE_FILE, tmp_path / "missing" / STATE_FILE):
        with pytest.raises(CheckpointError) as err:
            load_state(path)
        assert str(err.value).startswith(f"checkpoint: cannot load {path}: ")
        assert "\n" not in str(err.value)
    # (a resume then takes the previous checkpoint: tests/test_train.py, interrupted run)


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path):
    save_state(tmp_path, {"epoch": 1})
    with pytest.raises(Exception):
        save_state(tmp_path, {"epoch": 2, "bad": lambda: None})  # cannot be pickled
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]
    assert load_state(tmp_path / STATE_FILE)["epoch"] == 1


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.normal()  # numpy caches a Gaussian: part of its state
    save_state(tmp_path, {"rng": [rng_state()]})
    expected = (torch.rand(3), np.random.normal(size=3), [random.random() for _ in range(3)])
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state(load_state(tmp_path / STATE_FILE)["rng"][0])
    torch.testing.assert_close(torch.rand(3), expected[0])
    np.testing.assert_array_equal(np.random.normal(size=3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_a_trained_engine_state_loads_with_weights_only(tmp_path):
    cfg = load_experiment(None, ["data.limit=128", "optim.batch_size=32", "model.width=8",
                             "model.hidden_dim=32", "model.out_dim=16", "model.n_prototypes=20",
                             "optim.name=lars", "swav.queue_length=128",
                             "swav.epoch_queue_starts=0"])
    training = build_training(cfg)
    training.run_epoch(0)
    save_state(tmp_path, {"engine": training.engine.state_dict(), "epoch": 0,
                          "rng": [rng_state()], "config": cfg.to_dict()})
    state = load_state(tmp_path / STATE_FILE)
    again = build_training(cfg)
    again.engine.load_state_dict(state["engine"])
    assert again.engine.iteration == training.engine.iteration and again.engine.queue.full
    for name, value in training.engine.net.state_dict().items():
        torch.testing.assert_close(again.engine.net.state_dict()[name], value, rtol=0, atol=0)
    assert state["config"] == cfg.to_dict()
