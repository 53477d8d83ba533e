"""The data a run trained and evaluated on, recorded on its MLflow run (``mlflow.log_input``).

Each run gets two dataset inputs, contexts ``training`` and ``evaluation``: the source's URI or
path, the rows the run used (and the class names, where the data has them), and a digest of the
data as it was on disk (every file's path and size under ``data.path``, or the embedded digits'
pixels) and of how the run cut it (limit, held-out share, seed, columns), so the MLflow UI tells
runs on different data apart. Listing the files is cheap next to a run; nothing is read image by
image.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any

from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag

from orchestration.config import ExperimentConfig
from orchestration.tracking import CONTEXT_TAG
from swav.data import SourceSplits

__all__ = ["data_digest", "dataset_inputs"]



class _Data(MetaDataset):
    """A data set known by its source, digest and row count (MLflow's profile)."""

    def __init__(self, source, name: str, digest: str, rows: int | None,
                 classes: list[str] | None = None) -> None:
        super().__init__(source=source, name=name, digest=digest)
        self._rows, self._classes = rows, classes

    @property
    def profile(self) -> dict[str, Any] | None:
        found = {"num_rows": self._rows, "classes": self._classes}
        return {k: v for k, v in found.items() if v is not None} or None

    def to_dict(self) -> dict[str, str]:
        config = super().to_dict()
        if self.profile is not None:
            config["profile"] = json.dumps(self.profile)
        return config


def dataset_inputs(cfg: ExperimentConfig, splits: SourceSplits | None) -> list[DatasetInput]:
    """The run's training and evaluation inputs (rows from ``splits``, the data as the driver's
    checks opened it, else opened here where that is cheap; unknown otherwise)."""
    d = cfg.data
    if splits is None:
        splits = _cheaply_opened(cfg)
    digest = data_digest(cfg)
    name = d.source if not d.path else f"{d.source}:{os.path.basename(d.path.rstrip('/'))}"
    inputs = []
    for context, part in (("training", getattr(splits, "train", None)),
                          ("evaluation", getattr(splits, "heldout", None))):
        rows = len(part) if part is not None else None
        if context == "training" and d.limit is not None and rows is not None:
            rows = min(rows, d.limit)
        dataset = _Data(_source(cfg), f"{name} ({context})", digest, rows,
                        getattr(splits, "class_names", None))
        inputs.append(DatasetInput(dataset._to_mlflow_entity(),
                                   [InputTag(key=CONTEXT_TAG, value=context)]))
    return inputs


def _cheaply_opened(cfg: ExperimentConfig) -> SourceSplits | None:
    from orchestration.preflight import check_data

    try:
        return check_data(cfg)
    except Exception:  # noqa: BLE001  (the run itself says what is wrong with its data)
        return None


def _source(cfg: ExperimentConfig):
    d = cfg.data
    if not d.path:
        return CodeDatasetSource({"swav_ray.data": f"{d.source} (embedded)"})
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    path = d.path if "://" in d.path else os.path.abspath(os.path.expanduser(d.path))
    try:
        with warnings.catch_warnings():  # ("can be interpreted in multiple ways": one is taken)
            warnings.simplefilter("ignore", UserWarning)
            return resolve_dataset_source(path)
    except Exception:  # noqa: BLE001  (a scheme MLflow has no source type for)
        return CodeDatasetSource({"swav_ray.data": path})


def data_digest(cfg: ExperimentConfig) -> str:
    """16 hex digits naming the data as it is now and as the run cuts it."""
    d = cfg.data
    h = hashlib.sha256(json.dumps({
        "source": d.source, "limit": d.limit, "holdout_fraction": d.holdout_fraction,
        "seed": cfg.scaling.seed, "image_column": d.image_column,
        "label_column": d.label_column}, sort_keys=True).encode())
    if not d.path:
        from swav.data import load_digits_arrays

        for array in load_digits_arrays():
            h.update(array.tobytes())
    else:
        for entry in _listing(d.path):
            h.update(f"{entry[0]}\0{entry[1]}\n".encode())
    return h.hexdigest()[:16]


def _listing(path: str) -> list[tuple[str, int]]:
    """Every file under ``path`` (or the file itself) as (path relative to it, size), sorted;
    local or a URI pyarrow opens."""
    import pyarrow.fs as pafs

    from swav.data import open_location

    try:
        fs, base = open_location(path)
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.File:
            return [(os.path.basename(base), info.size)]
        found = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except (OSError, ValueError):
        return []  # (checked before: the run itself says what is wrong with the path)
    return sorted((i.path[len(base):].lstrip("/"), i.size) for i in found
                  if i.type == pafs.FileType.File)
