"""Tests for orchestration.run_lock: one process per run directory, stale locks taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from orchestration.config import ConfigError
from orchestration.run_lock import LOCK_FILE, Heartbeat, RunLock


def test_a_held_run_is_refused_naming_the_holder_and_released_after(tmp_path):
    run_dir = tmp_path / "runs" / "exp-1"
    with RunLock(str(run_dir)) as lock:
        holder = json.loads((run_dir / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(ConfigError, match=rf"^scaling.run_name: run 'exp-1' is in use by "
                                              rf"process {os.getpid()} on "):
            RunLock(str(run_dir)).__enter__()
        assert lock.held
    assert not (run_dir / LOCK_FILE).exists()
    with pytest.raises(RuntimeError):
        with RunLock(str(run_dir)):
            raise RuntimeError("training failed")
    assert not (run_dir / LOCK_FILE).exists()  # released on failure too


def _write_lock(run_dir, pid: int, host: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host, "since": "then"}))


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    import socket

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    _write_lock(tmp_path, int(gone.stdout), socket.gethostname())
    with RunLock(str(tmp_path)):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_another_host_s_lock_holds_until_its_heartbeat_is_stale(tmp_path):
    _write_lock(tmp_path, 1, "another-node")
    with pytest.raises(ConfigError, match="in use by process 1 on another-node"):
        RunLock(str(tmp_path), stale_after=60).__enter__()
    old = time.time() - 120
    os.utime(tmp_path / LOCK_FILE, (old, old))
    with RunLock(str(tmp_path), stale_after=60) as lock:
        stamp = (tmp_path / LOCK_FILE).stat().st_mtime
        os.utime(tmp_path / LOCK_FILE, (old, old))
        Heartbeat(lock).after_report(None, [{}], None)  # what the Train controller calls
        assert (tmp_path / LOCK_FILE).stat().st_mtime >= stamp


def test_a_torn_lock_is_taken_over_and_object_stores_are_not_locked(tmp_path):
    (tmp_path / LOCK_FILE).write_text("")  # the holder crashed mid-write
    with RunLock(str(tmp_path)) as lock:
        assert lock.held
    with RunLock("s3://bucket/runs/exp-1") as lock:
        assert not lock.held and lock.path is None


def test_a_lock_appears_whole_and_its_claim_file_is_gone(tmp_path, monkeypatch):
    """The lock is written in a file of its own and linked into place: at no moment does the
    lock exist without its holder (read as a stale lock, it let two starts both take it). Where
    the file system has no hard links it is created exclusively and copied."""
    import orchestration.run_lock as run_lock

    run_dir = tmp_path / "run"
    seen = []
    real_link = os.link

    def watched_link(source, target):
        real_link(source, target)
        seen.append(json.loads((run_dir / LOCK_FILE).read_text()))  # the moment it exists

    monkeypatch.setattr(run_lock.os, "link", watched_link)
    with RunLock(str(run_dir)):
        assert seen and seen[0]["pid"] == os.getpid()
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # no claim file left

    def no_links(source, target):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(run_lock.os, "link", no_links)
    with RunLock(str(run_dir)):
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(ConfigError, match="is in use by process"):
            RunLock(str(run_dir)).__enter__()
    assert list(run_dir.iterdir()) == []
