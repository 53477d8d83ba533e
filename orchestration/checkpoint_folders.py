"""The run's checkpoint folders on its storage: which to resume from, what each new one is named,
and how it gets there whole.

Ray Train keeps a list of the checkpoints it registered (``num_to_keep=2``) and deletes the oldest
folder of that list by its path.  So a folder name must never be reused while Ray still lists
it: a resume that falls back past an unreadable checkpoint (``checkpoint_epoch000005``, torn by
a kill or a full disk) trains that epoch again into ``checkpoint_epoch000005-1``, and Ray later
deletes the torn folder rather than the new one.  Names sort by epoch, then by that suffix.

A checkpoint reaches a local or shared file system through a hidden staging folder renamed into
place, so a reader never finds a half-written ``state.pt`` under a checkpoint's name; on an object
store (``s3://``) each object appears whole by itself, and a failed upload's objects are removed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pyarrow.fs as pafs
import ray.train

from orchestration.ray_compat import checkpoint_destination

__all__ = ["PREFIX", "FolderNames", "newest_first", "unregistered", "upload_whole"]

log = logging.getLogger(__name__)
PREFIX = "checkpoint_epoch"
STAGING = ".staging-"


def _listing(latest: ray.train.Checkpoint) -> list[pafs.FileInfo]:
    """The folders beside the latest checkpoint (in the run's storage folder)."""
    parent = latest.path.rstrip("/").rpartition("/")[0]
    try:
        infos = latest.filesystem.get_file_info(pafs.FileSelector(parent))
    except OSError:
        return []
    return [i for i in infos if i.type == pafs.FileType.Directory]


def _siblings(latest: ray.train.Checkpoint) -> tuple[list[str], list[str]]:
    """Checkpoint folders beside the latest one: (older, newest first; newer). Names sort by
    epoch (and a retrained epoch's suffix), and Ray registers them in that order."""
    own = latest.path.rstrip("/").rpartition("/")[2]
    names = [i for i in _listing(latest) if i.base_name.startswith(PREFIX)]
    older = sorted((i.path for i in names if i.base_name < own), reverse=True)
    return older, sorted(i.path for i in names if i.base_name > own)


def newest_first(latest: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """The latest checkpoint, then the older ones Ray kept beside it (``num_to_keep``)."""
    older, _ = _siblings(latest)
    return [latest, *(ray.train.Checkpoint(p, filesystem=latest.filesystem) for p in older)]


def unregistered(latest: ray.train.Checkpoint) -> list[str]:
    """Folders newer than Ray's latest checkpoint, and staging folders: written (perhaps in
    part) by an attempt that died before Ray registered them; a resume removes them so nothing
    ever lists them."""
    staging = [i.path for i in _listing(latest) if i.base_name.startswith(STAGING)]
    return [*_siblings(latest)[1], *staging]


@dataclass
class FolderNames:
    """Names of the checkpoints a worker group writes: ``checkpoint_epoch000005``, or with a
    suffix where a folder Ray still lists holds that epoch (an unreadable one trained again).
    ``retrained``: the epochs trained a second time because their checkpoint did not load."""

    taken: set[str] = field(default_factory=set)
    retrained: set[int] = field(default_factory=set)

    @classmethod
    def after_restore(cls, latest: ray.train.Checkpoint, resumed_epoch: int,
                      unreadable: list[str]) -> FolderNames:
        """``unreadable``: the checkpoint folders skipped for ``resumed_epoch``'s (newest first)."""
        taken = {p.rstrip("/").rpartition("/")[2] for p in _paths(latest)}
        retrained = {e for e in map(_epoch_of, unreadable) if e is not None and e > resumed_epoch}
        return cls(taken, retrained)

    def name(self, epoch: int) -> str:
        name, n = f"{PREFIX}{epoch:06d}", 0
        while name in self.taken:
            n += 1
            name = f"{PREFIX}{epoch:06d}-{n}"
        return name


def _paths(latest: ray.train.Checkpoint) -> list[str]:
    return [latest.path, *_siblings(latest)[0]]


def _epoch_of(path: str) -> int | None:
    base = path.rstrip("/").rpartition("/")[2]
    digits = base[len(PREFIX):].split("-")[0]
    return int(digits) if base.startswith(PREFIX) and digits.isdigit() else None


def upload_whole(checkpoint: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
    """Ray Train's ``checkpoint_upload_fn``: the checkpoint under ``name`` in the run's storage,
    whole or not at all (see the module's docstring)."""
    fs, final = checkpoint_destination(name)
    local = isinstance(fs, pafs.LocalFileSystem)
    target = final if not local else f"{final.rpartition('/')[0]}/{STAGING}{name}"
    try:
        fs.create_dir(target)
        pafs.copy_files(checkpoint.path, target, source_filesystem=checkpoint.filesystem,
                        destination_filesystem=fs)
        if local:
            fs.move(target, final)
    except BaseException:
        _remove(fs, target)
        raise
    return ray.train.Checkpoint(final, filesystem=fs)


def _remove(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_dir(path)
    except OSError as err:  # (the storage that failed the upload may refuse this too)
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            log.warning("could not remove the partial checkpoint %s: %s", path, err)
