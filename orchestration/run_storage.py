"""Where a run's checkpoints live (a local folder or a URI such as ``s3://``), seen from the
driver: whether it answers, waiting for it after an outage, whether it holds checkpoints.

Object storage goes away now and then (a MinIO restart, a network partition). A run whose
storage refuses a write fails; the driver then waits for the storage to answer again (up to
``STORAGE_WAIT_S``) and resumes from the last checkpoint there, instead of leaving a resume to
the user.
"""

from __future__ import annotations

import sys
import time

import pyarrow.fs as pafs

from swav.data import open_location

__all__ = ["STORAGE_WAIT_S", "answers", "has_checkpoints", "wait_until_it_answers"]

STORAGE_WAIT_S = 600.0  # longer outages need a person; the run's checkpoints stay for a resume
PROBE_EVERY_S = 5.0


def _listing(run_dir: str) -> list[pafs.FileInfo]:
    fs, base = open_location(run_dir)
    return fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))


def answers(run_dir: str) -> bool:
    """Whether the storage under ``run_dir`` can be listed now."""
    try:
        _listing(run_dir)
    except (OSError, ValueError):
        return False
    return True


def wait_until_it_answers(run_dir: str, cause: str, limit_s: float = STORAGE_WAIT_S) -> bool:
    """Probe ``run_dir`` every few seconds until it answers (True) or ``limit_s`` passes
    (False); says once on stderr what it waits for."""
    if answers(run_dir):
        return True
    sys.stderr.write(f"swav-ray: the run's storage {run_dir} does not answer ({cause}); "
                     f"waiting up to {limit_s / 60:.0f} min for it\n")
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        time.sleep(PROBE_EVERY_S)
        if answers(run_dir):
            return True
    return False


def has_checkpoints(run_dir: str) -> bool:
    """Whether any checkpoint folder was written under ``run_dir``; a storage that cannot be
    listed now may hold some (say where they would be)."""
    try:
        found = _listing(run_dir)
    except (OSError, ValueError):
        return "://" in run_dir
    return any(i.base_name.startswith("checkpoint_") for i in found)
