"""Image sources for SwAV: the embedded default, torchvision data sets, ImageFolder and Parquet.

Every source yields ``(PIL RGB image, label or None)`` and is split into a training set and a
held-out set (its own test split, or a seeded ``holdout_fraction`` of the images).  Workers take
contiguous, equal-sized shards (:func:`shard`), so a Parquet worker reads only the row groups of
its own rows.  An image that cannot be decoded becomes ``None`` in :class:`Transformed` and is
dropped (and counted) by :func:`collate_skipping_corrupt`, so it never ends a long run.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from swav.multicrop import multicrop_collate

__all__ = [
    "ArrayImageDataset",
    "Batch",
    "ParquetImageDataset",
    "SourceSplits",
    "Transformed",
    "collate_skipping_corrupt",
    "eval_transform",
    "load_digits_arrays",
    "missing_locally",
    "open_source",
    "shard",
    "subset",
]

log = logging.getLogger(__name__)
SOURCES = ("digits", "cifar10", "cifar100", "stl10", "imagefolder", "parquet")
DOWNLOADABLE = ("cifar10", "cifar100", "stl10")  # torchvision fetches them with download=True


def missing_locally(source: str, path: str | None, download: bool = False) -> bool:
    """A local ``path`` that this machine lacks (remote stores and downloads aside): on a cluster
    only the nodes that read the data can say whether it is there."""
    return (path is not None and "://" not in path
            and not (download and source in DOWNLOADABLE)
            and not Path(path).expanduser().exists())


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits (1,797 8x8 images, 10 classes; ships with the package).

    Returns ``uint8`` images ``[N, 8, 8]`` scaled from 0..16 to 0..255 and ``int64`` labels.
    Read from the package's CSV file as ``sklearn.datasets.load_digits`` reads it, without
    importing scikit-learn (whose import every worker process of a digits run would pay); where
    the file is not there, through ``load_digits``.
    """
    table = _digits_csv()
    if table is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels, target = digits.images, digits.target
    else:
        pixels, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    images = np.clip(pixels * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    return images, target.astype(np.int64)


def _digits_csv() -> np.ndarray | None:
    """``sklearn/datasets/data/digits.csv.gz`` (64 pixel columns and the label), found without
    importing the package; None where it is not."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        return None
    table = np.loadtxt(path, delimiter=",")
    return table if table.ndim == 2 and table.shape[1] == 65 else None


class ArrayImageDataset(Dataset):
    """Images held as a ``uint8`` array (``[N, H, W]`` grey or ``[N, H, W, 3]``) with labels.

    Items are ``(transform(PIL RGB image), label)``; without a transform the PIL image itself.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None = None,
        transform: Callable | None = None,
    ) -> None:
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(
                f"images: expected uint8 [N, H, W] or [N, H, W, 3], got {images.dtype} {images.shape}"
            )
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"labels: {len(labels)} labels for {len(images)} images")
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index]).convert("RGB")
        sample = self.transform(img) if self.transform is not None else img
        label = None if self.labels is None else int(self.labels[index])
        return sample, label

    def tensors(self, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All images as a float ``[N, 3, H, W]`` tensor in [0, 1] (optionally resized)."""
        x = torch.from_numpy(self.images).float().div_(255.0)
        x = x.unsqueeze(1).expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        if size is not None and x.shape[-1] != size:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                                align_corners=False)
        labels = None if self.labels is None else torch.from_numpy(self.labels)
        return x.contiguous(), labels


def open_location(path: str | Path) -> tuple[Any, str]:
    """A local path, or a URI that pyarrow's file systems take (``s3://bucket/prefix``,
    ``gs://``, ``hdfs://``, ...), as (pyarrow file system, path within it). Object stores find
    their credentials and endpoint the standard way (for S3: the AWS chain, ``AWS_ENDPOINT_URL``
    for an S3-compatible store)."""
    import pyarrow.fs as pafs

    text = str(path)
    if "://" not in text:
        return pafs.LocalFileSystem(), str(Path(text).expanduser().absolute())
    try:
        return pafs.FileSystem.from_uri(text)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"path: cannot open {text!r} ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _parquet_files(fs: Any, base: str, shown: str) -> list[str]:
    """The ``*.parquet`` files at ``base`` (a file, or a folder searched recursively), sorted;
    a ValueError naming what is missing: the bucket, or any Parquet file there."""
    import pyarrow.fs as pafs

    try:
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.File:
            return [base]
        if info.type == pafs.FileType.Directory:
            found = fs.get_file_info(pafs.FileSelector(base, recursive=True))
            files = sorted(i.path for i in found
                           if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
            if files:
                return files
        elif "://" in shown:  # an object store: is the bucket there at all?
            bucket = base.split("/", 1)[0]
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise ValueError(f"path: bucket {bucket!r} does not exist ({shown!r})")
    except OSError as err:  # refused credentials, an unreachable endpoint
        raise ValueError(f"path: cannot read {shown!r} ({_first_line(err)})") from None
    raise ValueError(f"path: no .parquet files under {shown!r}")


class ParquetImageDataset(Dataset):
    """Images stored as encoded bytes in Parquet (a file or a folder of ``*.parquet``, local or
    in object storage: :func:`open_location`).

    ``image_column`` holds bytes (or a struct with a ``bytes`` field, as Hugging Face writes);
    ``label_column`` (optional) integer labels.  Construction reads only the metadata; a dataset
    restricted to some rows (``rows``) reads just the row groups that contain them, on first use.
    """

    def __init__(
        self,
        path: str | Path,
        image_column: str = "image",
        label_column: str | None = "label",
        rows: Sequence[int] | None = None,
    ) -> None:
        import pyarrow.parquet as pq

        shown = str(path) if "://" in str(path) else str(Path(path).expanduser())
        self.filesystem, base = open_location(path)
        self.files = _parquet_files(self.filesystem, base, shown)
        self.image_column, self.label_column = image_column, label_column
        self._groups: list[tuple[int, int, int]] = []  # (file index, row group, first global row)
        self.metadata: dict[str, str] = {}
        total = 0
        for f, file in enumerate(self.files):
            name = file.rpartition("/")[2]
            try:
                meta = pq.ParquetFile(file, filesystem=self.filesystem)
            except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
                where = file if "://" not in shown else f"{shown.split('://')[0]}://{file}"
                raise ValueError(f"path: {where!r} is not a readable Parquet file "
                                 f"({_first_line(err)})") from None
            names = meta.schema_arrow.names
            if image_column not in names:
                raise ValueError(f"image_column: {image_column!r} not in {name} ({names})")
            if label_column is not None and label_column not in names:
                raise ValueError(f"label_column: {label_column!r} not in {name} ({names})")
            if f == 0:  # (key/value pairs of the file's schema, e.g. the class names)
                self.metadata = {k.decode(errors="replace"): v.decode(errors="replace")
                                 for k, v in (meta.schema_arrow.metadata or {}).items()}
            for g in range(meta.num_row_groups):
                self._groups.append((f, g, total))
                total += meta.metadata.row_group(g).num_rows
        self.total_rows = total
        self.rows = np.arange(total) if rows is None else np.asarray(rows, dtype=np.int64)
        self._cache: dict[int, tuple[object, int | None]] | None = None

    def restrict(self, rows: Sequence[int]) -> ParquetImageDataset:
        """The same source limited to ``rows`` (global row numbers)."""
        out = ParquetImageDataset.__new__(ParquetImageDataset)
        out.__dict__.update(self.__dict__)
        out.rows = self.rows[np.asarray(rows, dtype=np.int64)]
        out._cache = None
        return out

    def load(self) -> None:
        """Read the image bytes (and labels) of this dataset's rows: only their row groups."""
        import pyarrow.parquet as pq

        wanted = set(int(r) for r in self.rows)
        starts = [g[2] for g in self._groups] + [self.total_rows]
        columns = [self.image_column] + ([self.label_column] if self.label_column else [])
        cache: dict[int, tuple[object, int | None]] = {}
        handles: dict[int, object] = {}
        for i, (f, g, first) in enumerate(self._groups):
            mine = [r for r in range(first, starts[i + 1]) if r in wanted]
            if not mine:
                continue
            handle = handles.setdefault(f, pq.ParquetFile(self.files[f],
                                                          filesystem=self.filesystem))
            table = handle.read_row_group(g, columns=columns)  # type: ignore[attr-defined]
            images = table.column(self.image_column).to_pylist()
            labels = table.column(self.label_column).to_pylist() if self.label_column else None
            for r in mine:
                cache[r] = (images[r - first], None if labels is None else labels[r - first])
        self._cache = cache

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        if self._cache is None:
            self.load()
        raw, label = self._cache[int(self.rows[index])]  # type: ignore[index]
        if isinstance(raw, dict):
            raw = raw.get("bytes")
        img = Image.open(io.BytesIO(raw))  # type: ignore[arg-type]
        img.load()
        return img.convert("RGB"), None if label is None else int(label)

    def labels(self) -> np.ndarray | None:
        """Labels of all rows, read from the label column alone (for splitting/evaluation)."""
        if self.label_column is None:
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq

        values = []
        for f in self.files:
            name = f.rpartition("/")[2]
            column = pq.read_table(f, columns=[self.label_column],
                                   filesystem=self.filesystem).column(0)
            if not pa.types.is_integer(column.type):
                raise ValueError(f"label_column: {self.label_column!r} in {name} holds "
                                 f"{column.type}, expected integer class ids (set "
                                 f"data.label_column=null for images without labels)")
            if column.null_count:
                raise ValueError(f"label_column: {self.label_column!r} in {name} has "
                                 f"{column.null_count} missing labels")
            values.append(column.to_numpy())
        return np.concatenate(values)[self.rows]


class Transformed(Dataset):
    """``(transform(image), label)`` of a source; ``None`` for an image that fails to decode."""

    def __init__(self, base: Dataset, transform: Callable) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        try:
            image, label = self.base[index]
            return self.transform(image), label
        except (OSError, ValueError, SyntaxError) as err:  # PIL's decode errors
            log.warning("skipping corrupt image %d: %s", index, err)
            return None


@dataclass
class Batch:
    """A collated training batch: crop groups, labels (or None) and the corrupt images dropped."""

    crops: list[torch.Tensor] | torch.Tensor
    labels: torch.Tensor | None
    corrupt: int


def collate_skipping_corrupt(samples: list, multicrop: bool = True) -> Batch:
    """Drop undecodable samples; refill the batch by repeating good ones so its size stays fixed.

    Every worker then runs the same number of equally sized steps (collectives stay in step).
    """
    good = [s for s in samples if s is not None]
    corrupt = len(samples) - len(good)
    if not good:
        raise RuntimeError(f"all {len(samples)} images of a batch failed to decode")
    good += [good[i % len(good)] for i in range(corrupt)]
    if multicrop:
        crops, labels = multicrop_collate(good)
        return Batch(crops, labels, corrupt)
    images = torch.stack([s[0] for s in good])
    labels = [s[1] for s in good]
    label_tensor = None if any(lb is None for lb in labels) else torch.tensor(labels)
    return Batch(images, label_tensor, corrupt)


def collate_eval(samples: list) -> Batch:
    return collate_skipping_corrupt(samples, multicrop=False)


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """Evaluation view: resize the short side to ``size``, centre crop, normalise."""
    import torchvision.transforms as T

    return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])


# -- sources and splits ----------------------------------------------------------------------

@dataclass
class SourceSplits:
    """Raw (untransformed) training and held-out sets of a source."""

    train: Dataset
    heldout: Dataset | None
    n_classes: int | None
    class_names: list[str] | None = None  # label i's name, where the data names its classes


def _holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_held = max(1, int(round(n * fraction)))
    return np.sort(order[n_held:]), np.sort(order[:n_held])


def subset(dataset: Dataset, rows: np.ndarray) -> Dataset:
    if isinstance(dataset, ParquetImageDataset):
        return dataset.restrict(rows)
    return Subset(dataset, rows.tolist())


def open_source(
    source: str,
    path: str | None = None,
    download: bool = False,
    image_column: str = "image",
    label_column: str | None = "label",
    holdout_fraction: float = 0.2,
    seed: int = 0,
    limit: int | None = None,
    class_names: str | Sequence[str] | None = None,
) -> SourceSplits:
    """Open a source by name and split it into training and held-out sets (no transforms yet).

    ``class_names``: the names of labels 0, 1, ...; a string is the Parquet schema metadata key
    that holds them; None: the source's own (torchvision's ``classes``, ImageFolder's folders,
    Parquet metadata ``classes``), else none.
    """
    import torchvision.datasets as tvd

    if path is None or "://" in path:  # (a URI: only Parquet reads object storage)
        root = path
    else:
        root = str(Path(path).expanduser())
    if root is not None and "://" in root and source != "parquet":
        raise ValueError(f"path: source {source!r} reads a local folder; keep images in object "
                         f"storage as Parquet (data.source=parquet)")
    if source in ("cifar10", "cifar100", "stl10") and root is None:
        raise ValueError(f"path: required for source {source!r} (its download/cache folder)")
    if source == "cifar10" or source == "cifar100":
        cls = tvd.CIFAR10 if source == "cifar10" else tvd.CIFAR100
        train = cls(root, train=True, download=download)
        held: Dataset | None = cls(root, train=False, download=download)
        splits = SourceSplits(train, held, 10 if source == "cifar10" else 100)
    elif source == "stl10":
        # SSL on the 100k unlabelled + 5k labelled images; kNN on test. Labels of the
        # unlabelled part are -1, so they are mapped to None.
        train = _NoNegativeLabels(tvd.STL10(root, split="train+unlabeled", download=download))
        splits = SourceSplits(train, tvd.STL10(root, split="test", download=download), 10)
    elif source == "parquet" and _parquet_split_layout(root) is not None:
        # train.parquet + test.parquet (or train/ + test/): the test part is the held-out set.
        train_path, test_path = _parquet_split_layout(root)  # type: ignore[misc]
        train = ParquetImageDataset(train_path, image_column, label_column)
        labels = train.labels()
        splits = SourceSplits(train, ParquetImageDataset(test_path, image_column, label_column),
                              None if labels is None else int(labels.max()) + 1)
    else:
        if source == "digits":
            images, labels = load_digits_arrays()
            full: Dataset = ArrayImageDataset(images, labels)
            all_labels: np.ndarray | None = labels
        elif source == "imagefolder":
            full = tvd.ImageFolder(root)  # Stanford Dogs: Images/<breed>/*.jpg
            all_labels = np.asarray(full.targets)
        elif source == "parquet":
            full = ParquetImageDataset(root, image_column, label_column)
            all_labels = full.labels()
        else:
            raise ValueError(f"source: unknown source {source!r}, expected one of {SOURCES}")
        train_rows, held_rows = _holdout_split(len(full), holdout_fraction, seed)  # type: ignore
        n_classes = None if all_labels is None else int(all_labels.max()) + 1
        splits = SourceSplits(subset(full, train_rows), subset(full, held_rows), n_classes)
    if limit is not None and limit < len(splits.train):  # type: ignore[arg-type]
        splits.train = subset(splits.train, np.arange(limit))
    splits.class_names = _class_names(source, splits, class_names)
    return splits


def _class_names(source: str, splits: SourceSplits,
                 wanted: str | Sequence[str] | None) -> list[str] | None:
    """Label names: given, read from the data (see :func:`open_source`), checked to cover every
    label."""
    names: list[str] | None = None
    if wanted is not None and not isinstance(wanted, str):
        names = [str(n) for n in wanted]
    elif source == "parquet":
        base = _unwrapped(splits.train)
        key = wanted or "classes"
        text = getattr(base, "metadata", {}).get(key)
        if text is None and wanted is not None:
            raise ValueError(f"class_names: no key {key!r} in the Parquet schema's metadata "
                             f"(keys: {sorted(getattr(base, 'metadata', {}))})")
        if text is not None:
            names = _parse_names(text, key)
    elif wanted is not None:
        raise ValueError(f"class_names: a metadata key ({wanted!r}) names classes of Parquet "
                         f"data only; give source {source!r} a list of names")
    elif source != "digits":  # (the digits' labels are their names)
        names = getattr(_unwrapped(splits.train), "classes", None)
        if names and all(_WORDNET_ID.match(n) for n in names):  # n02085620-Chihuahua
            names = [_WORDNET_ID.sub("", n) for n in names]
    if names is not None and splits.n_classes is not None and len(names) < splits.n_classes:
        raise ValueError(f"class_names: {len(names)} names for {splits.n_classes} classes "
                         f"(labels 0..{splits.n_classes - 1})")
    return None if names is None else [str(n) for n in names]


_WORDNET_ID = re.compile(r"^n[0-9]{8}[-_]")  # ImageNet-style folder names (Stanford Dogs)


def _parse_names(text: str, key: str) -> list[str]:
    """A JSON list, or names separated by commas."""
    if text.lstrip().startswith("["):
        try:
            return [str(n) for n in json.loads(text)]
        except ValueError:
            raise ValueError(f"class_names: metadata {key!r} is not a JSON list") from None
    return [n.strip() for n in text.split(",")]


def _unwrapped(dataset: Dataset) -> Dataset:
    """The data set under Subset / label-filtering wrappers."""
    while isinstance(dataset, (Subset, _NoNegativeLabels)):
        dataset = dataset.dataset if isinstance(dataset, Subset) else dataset.base
    return dataset


def _parquet_split_layout(root: str | None) -> tuple[str, str] | None:
    """``root/train.parquet`` and ``root/test.parquet`` (or ``train/`` and ``test/`` folders),
    local or in object storage."""
    import pyarrow.fs as pafs

    if root is None:
        return None
    fs, base = open_location(root)
    try:
        if fs.get_file_info(base).type != pafs.FileType.Directory:
            return None
        for train, test in (("train.parquet", "test.parquet"), ("train", "test")):
            kinds = {fs.get_file_info(f"{base}/{part}").type for part in (train, test)}
            if pafs.FileType.NotFound not in kinds:
                joined = str(root).rstrip("/")
                return f"{joined}/{train}", f"{joined}/{test}"
    except OSError:  # (reported by the dataset that reads it)
        return None
    return None


class _NoNegativeLabels(Dataset):
    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return image, (None if label is None or label < 0 else int(label))


def shard(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    """This worker's contiguous block of ``len // world_size`` items (equal on every worker)."""
    n = len(dataset) // world_size  # type: ignore[arg-type]
    if n == 0:
        raise ValueError(f"data: {len(dataset)} images cannot be split over {world_size} workers")
    rows = np.arange(rank * n, (rank + 1) * n)
    if isinstance(dataset, Subset) and not isinstance(dataset.dataset, ParquetImageDataset):
        return Subset(dataset.dataset, [dataset.indices[i] for i in rows])
    return subset(dataset, rows)
