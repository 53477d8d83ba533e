"""Training checkpoints that load without running code, written so no reader sees half a file.

A checkpoint (``state.pt`` in a Ray Train checkpoint directory) holds only tensors and plain
Python values: the engine's state dicts, the epoch, every rank's RNG states (numpy's and Python's
converted to a tensor and lists) and the config as a dict.  It is read with
``torch.load(weights_only=True)``, so a file planted on shared storage or ``s3://`` cannot execute
anything; a file that does not load is one :class:`CheckpointError` line naming it.  A resume
whose newest checkpoint is unreadable (a kill or a full disk mid-upload) falls back to the
previous one that Ray keeps (``CheckpointConfig(num_to_keep=2)``).
"""

from __future__ import annotations

import os
import pickle
import random
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestration.config import ExperimentConfig

__all__ = ["STATE_FILE", "CheckpointError", "default_run_name", "load_state", "rng_state",
           "save_state", "set_rng_state", "storage_root"]

STATE_FILE = "state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded (unreadable, truncated, or not plain tensors/values)."""


def default_run_name(experiment: str) -> str:
    """``<experiment>-<YYYYmmdd-HHMMSS>-<6 hex>``: sorted by time, unique within a second."""
    return f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def storage_root(cfg: ExperimentConfig) -> str:
    """``scaling.storage_path`` as Ray Train takes it: a URI as is, a local path absolute."""
    path = cfg.scaling.storage_path
    return path if "://" in path else str(Path(path).expanduser().resolve())


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (``weights_only``-loadable)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": [version, list(internal), gauss_next],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(directory: Path, state: dict[str, Any]) -> Path:
    """Write ``directory/state.pt`` through a temporary file, flushed to disk, then renamed: a
    kill or a full disk leaves the previous file (or none), never a partial one."""
    path, tmp = directory / STATE_FILE, directory / (STATE_FILE + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


def load_state(path: str | Path, shown_as: str | None = None) -> dict[str, Any]:
    """A checkpoint's state, loaded with ``weights_only=True``; CheckpointError names the file
    (as ``shown_as``, where the file read is a local copy of it)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        reason = ("it holds objects other than tensors and plain values, which are refused "
                  "(loading them could run code)")
    except Exception as err:  # a truncated zip, a missing file
        text = str(err).strip()
        reason = text.splitlines()[0].split(". ")[0] if text else type(err).__name__
    raise CheckpointError(f"checkpoint: cannot load {shown_as or path}: {reason}")
