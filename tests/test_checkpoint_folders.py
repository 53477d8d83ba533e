"""The run's checkpoint folders: which a resume tries (newest first), which it removes, and the
name each new checkpoint takes (an epoch trained again after an unreadable checkpoint never
reuses a folder Ray still lists). Whole runs through them: tests/test_train.py."""

from __future__ import annotations

import ray.train

from orchestration.checkpoint_folders import FolderNames, newest_first, unregistered


def _folders(root, *names: str) -> None:
    for name in names:
        (root / name).mkdir()
        (root / name / "state.pt").write_bytes(b"x")


def test_a_resume_tries_the_latest_then_older_ones_and_removes_what_ray_never_registered(
        tmp_path):
    _folders(tmp_path, "checkpoint_epoch000003", "checkpoint_epoch000004",
             "checkpoint_epoch000004-1", "checkpoint_epoch000005",
             ".staging-checkpoint_epoch000006")
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    latest = ray.train.Checkpoint(str(tmp_path / "checkpoint_epoch000004-1"))
    assert [c.path.rpartition("/")[2] for c in newest_first(latest)] == [
        "checkpoint_epoch000004-1", "checkpoint_epoch000004", "checkpoint_epoch000003"]
    assert [p.rpartition("/")[2] for p in unregistered(latest)] == [
        "checkpoint_epoch000005", ".staging-checkpoint_epoch000006"]


def test_an_epoch_trained_again_takes_a_name_of_its_own_and_is_marked_retrained(tmp_path):
    _folders(tmp_path, "checkpoint_epoch000004", "checkpoint_epoch000005")
    latest = ray.train.Checkpoint(str(tmp_path / "checkpoint_epoch000005"))
    names = FolderNames.after_restore(latest, resumed_epoch=4,
                                      unreadable=[str(tmp_path / "checkpoint_epoch000005")])
    assert names.retrained == {5}
    assert [names.name(e) for e in (5, 6)] == ["checkpoint_epoch000005-1",
                                              "checkpoint_epoch000006"]
    # The retrained one unreadable in turn: the next name up, sorting after both.
    _folders(tmp_path, "checkpoint_epoch000005-1")
    latest = ray.train.Checkpoint(str(tmp_path / "checkpoint_epoch000005-1"))
    again = FolderNames.after_restore(latest, resumed_epoch=4, unreadable=[
        str(tmp_path / "checkpoint_epoch000005-1"), str(tmp_path / "checkpoint_epoch000005")])
    assert again.name(5) == "checkpoint_epoch000005-2" and again.retrained == {5}
    assert sorted(["checkpoint_epoch000005-2", "checkpoint_epoch000005-1",
                   "checkpoint_epoch000005", "checkpoint_epoch000006"])[-2:] == [
        "checkpoint_epoch000005-2", "checkpoint_epoch000006"]
    # A fresh run (no checkpoint) names by epoch alone.
    assert FolderNames().name(0) == "checkpoint_epoch000000" and FolderNames().retrained == set()
