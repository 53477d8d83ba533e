"""One process at a time per run directory: a lock file created atomically, held while training.

Two ``swav-ray train`` with the same ``scaling.run_name`` and storage would log into one MLflow
run and delete each other's checkpoints. The second is refused while the first holds the lock.
A lock left by a process that is gone (killed, the machine rebooted) is taken over: on the same
host by checking its process id, on another host only when its heartbeat (the file's mtime,
touched every epoch) is older than ``stale_after`` seconds. Object stores (``s3://``) have no
atomic create; runs there are not locked.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

from ray.train import UserCallback

from orchestration.config import ConfigError

__all__ = ["LOCK_FILE", "Heartbeat", "RunLock"]

LOCK_FILE = "run.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunLock:
    """``with RunLock(run_dir): ...`` holds ``run_dir/run.lock`` or raises ``ConfigError``."""

    def __init__(self, run_dir: str, stale_after: float = 3600.0) -> None:
        self.path = None if "://" in run_dir else Path(run_dir) / LOCK_FILE
        self.stale_after = stale_after
        self.held = False

    def __enter__(self) -> RunLock:
        if self.path is None:
            return self
        written = self._write_claim()
        try:
            self._take(written)
        finally:
            written.unlink(missing_ok=True)
        return self

    def _write_claim(self) -> Path:
        """The lock's whole content in a file of its own, linked into place in one step: a
        reader never sees a lock half written (it would take it for a stale one), and a disk
        with no room leaves no empty lock behind."""
        claim = self.path.with_name(f".{LOCK_FILE}.{socket.gethostname()}.{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(claim, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            claim.unlink(missing_ok=True)
            raise ConfigError(f"scaling.storage_path: cannot write the run's lock in "
                              f"{self.path.parent} ({err.strerror or err})") from None
        return claim

    def _take(self, claim: Path) -> None:
        for _ in range(2):  # a second try after removing a stale lock
            try:
                _link_or_copy(claim, self.path)
            except FileExistsError:
                holder = self._holder()
                if holder is None or self._stale(holder):
                    self.path.unlink(missing_ok=True)
                    continue
                raise ConfigError(
                    f"scaling.run_name: run {self.path.parent.name!r} is in use by process "
                    f"{holder.get('pid')} on {holder.get('host')} since {holder.get('since')} "
                    f"(lock {self.path}; delete it only if that process is gone)") from None
            self.held = True
            return
        raise ConfigError(f"scaling.run_name: could not take the lock {self.path}")

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # torn by a crash mid-write, or already released
        return holder if isinstance(holder, dict) else None

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") == socket.gethostname():
            return not _alive(int(holder.get("pid", -1)))
        try:
            return time.time() - self.path.stat().st_mtime > self.stale_after
        except OSError:
            return True

    def touch(self) -> None:
        """The heartbeat another host reads."""
        if self.held:
            os.utime(self.path)

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` made from ``source`` only if it does not exist (FileExistsError): a hard link,
    or on a file system without them an exclusive create and a copy."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(source.read_bytes())


class Heartbeat(UserCallback):
    """Ray Train callback: touches the lock at every report, from wherever the controller runs
    (a shared storage path is the same file on every node)."""

    def __init__(self, lock: RunLock) -> None:
        self.path = lock.path if lock.held else None

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if self.path is not None:
            try:
                os.utime(self.path)
            except OSError:
                pass  # released, or storage briefly unreachable: the next report retries
