"""Data sources: digits, Parquet and ImageFolder written by the test (one corrupt image each),
disjoint worker shards, corrupt-image skipping."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from swav.data import (
    Batch,
    ParquetImageDataset,
    Transformed,
    collate_skipping_corrupt,
    load_digits_arrays,
    open_source,
    shard,
)
from swav.multicrop import MultiCropTransform

CORRUPT = b"\xff\xd8\xff\xe0 this is not a jpeg"


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).convert("RGB").resize((16, 16)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def digits():
    return load_digits_arrays()


def test_the_digits_are_scikit_learn_s_scaled_to_uint8(digits):
    """Read from the package's CSV file: the images and labels ``load_digits`` gives, 0..16
    scaled to 0..255."""
    from sklearn.datasets import load_digits

    images, labels = digits
    reference = load_digits()
    assert images.dtype == np.uint8 and images.shape == (1797, 8, 8)
    np.testing.assert_array_equal(labels, reference.target)
    np.testing.assert_array_equal(images, np.round(reference.images * 255 / 16).astype(np.uint8))
    assert images.max() == 255 and images.min() == 0


@pytest.fixture()
def parquet_dir(tmp_path, digits):
    """Two Parquet files of 60 digits each (row groups of 20); row 7 is corrupt."""
    images, labels = digits
    for part in range(2):
        rows = range(part * 60, (part + 1) * 60)
        blobs = [CORRUPT if r == 7 else _jpeg(images[r]) for r in rows]
        table = pa.table({"image": pa.array(blobs, pa.binary()),
                          "label": pa.array([int(labels[r]) for r in rows], pa.int64())})
        pq.write_table(table, tmp_path / f"part-{part}.parquet", row_group_size=20)
    return tmp_path


@pytest.fixture()
def imagefolder(tmp_path, digits):
    images, labels = digits
    for i in range(40):
        folder = tmp_path / f"class_{labels[i]}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(images[i]).resize((16, 16)).save(folder / f"{i}.png")
    (tmp_path / "class_0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return tmp_path


def test_digits_source_is_the_scikit_learn_data_set_split_by_seed():
    a = open_source("digits", holdout_fraction=0.2, seed=0)
    b = open_source("digits", holdout_fraction=0.2, seed=0)
    assert len(a.train) + len(a.heldout) == 1797 and len(a.heldout) == 359
    assert a.n_classes == 10
    assert a.train.indices == b.train.indices
    assert not set(a.train.indices) & set(a.heldout.indices)
    image, label = a.train[0]
    assert image.size == (8, 8) and image.mode == "RGB" and 0 <= label < 10


def test_parquet_source_reads_images_labels_and_splits(parquet_dir, digits):
    splits = open_source("parquet", str(parquet_dir), holdout_fraction=0.25, seed=1)
    assert len(splits.train) == 90 and len(splits.heldout) == 30
    assert splits.n_classes == int(digits[1][:120].max()) + 1
    row = int(splits.train.rows[0])
    image, label = splits.train[0]
    assert label == int(digits[1][row]) and image.size == (16, 16)


def test_two_parquet_workers_read_disjoint_shards_and_only_their_row_groups(parquet_dir, monkeypatch):
    full = ParquetImageDataset(parquet_dir)
    shards = [shard(full, rank, 2) for rank in range(2)]
    assert [len(s) for s in shards] == [60, 60]
    assert not set(shards[0].rows) & set(shards[1].rows)
    read = []
    original = pq.ParquetFile.read_row_group

    def spy(self, i, *args, **kwargs):
        read.append((self.metadata.num_rows, i))
        return original(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    shards[1].load()
    assert len(read) == 3  # rows 60..119: the three row groups of the second file only
    assert set(shards[1]._cache) == set(range(60, 120))


def test_a_corrupt_parquet_image_is_skipped_and_counted(parquet_dir):
    data = Transformed(ParquetImageDataset(parquet_dir),
                       MultiCropTransform([2], [8], [0.5], [1.0], blur_prob=0.0))
    assert data[7] is None
    batch = collate_skipping_corrupt([data[i] for i in range(4, 12)])
    assert isinstance(batch, Batch) and batch.corrupt == 1
    assert batch.crops[0].shape == (2 * 8, 3, 8, 8)  # refilled to the full batch size
    assert batch.labels.shape == (8,)


def test_imagefolder_source_with_a_corrupt_file(imagefolder):
    splits = open_source("imagefolder", str(imagefolder), holdout_fraction=0.25, seed=0)
    assert len(splits.train) + len(splits.heldout) == 41
    data = Transformed(splits.train.dataset, MultiCropTransform([2], [8], [0.5], [1.0]))
    outcomes = [data[i] is None for i in range(len(data))]
    assert sum(outcomes) == 1


def test_shards_are_disjoint_equal_and_cover_the_floor(digits):
    splits = open_source("digits", holdout_fraction=0.2, seed=0)
    parts = [shard(splits.train, r, 3) for r in range(3)]
    sets = [set(p.indices) for p in parts]
    assert [len(s) for s in sets] == [len(splits.train) // 3] * 3
    assert not (sets[0] & sets[1]) and not (sets[1] & sets[2]) and not (sets[0] & sets[2])
    assert set().union(*sets) <= set(splits.train.indices)


def test_a_batch_of_only_corrupt_images_is_an_error():
    with pytest.raises(RuntimeError, match="failed to decode"):
        collate_skipping_corrupt([None, None])


def test_unknown_source_and_missing_columns_name_the_field(parquet_dir):
    with pytest.raises(ValueError, match="^source"):
        open_source("mnist")
    with pytest.raises(ValueError, match="^image_column"):
        ParquetImageDataset(parquet_dir, image_column="pixels")
    with pytest.raises(ValueError, match="^path"):
        ParquetImageDataset(parquet_dir / "nothing-here")
    with pytest.raises(ValueError, match="^path"):
        open_source("cifar10")
    assert torch.is_tensor(collate_skipping_corrupt([(torch.zeros(3), 1)], multicrop=False).crops)


def test_parquet_train_and_test_files_are_the_training_and_held_out_sets(tmp_path, digits):
    images, labels = digits
    for name, rows in (("train", range(0, 50)), ("test", range(50, 70))):
        table = pa.table({"image": [_jpeg(images[r]) for r in rows],
                          "label": [int(labels[r]) for r in rows]})
        pq.write_table(table, tmp_path / f"{name}.parquet")
    splits = open_source("parquet", str(tmp_path), holdout_fraction=0.5, limit=40)
    assert len(splits.train) == 40 and len(splits.heldout) == 20  # the file split, not 0.5
    assert [splits.heldout[i][1] for i in range(3)] == [int(v) for v in labels[50:53]]


def test_parquet_labels_must_be_integer_class_ids_with_none_missing(tmp_path, digits):
    images, labels = digits
    blobs = [_jpeg(images[r]) for r in range(6)]
    for name, column in (("text", pa.array(["3", "1", "4", "1", "5", "9"])),
                         ("floats", pa.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0])),
                         ("nulls", pa.array([3, None, 4, 1, None, 9], pa.int64()))):
        pq.write_table(pa.table({"image": blobs, "label": column}), tmp_path / f"{name}.parquet")
    with pytest.raises(ValueError, match=r"^label_column: 'label' in text.parquet holds string"):
        open_source("parquet", str(tmp_path / "text.parquet"))
    with pytest.raises(ValueError, match=r"^label_column: 'label' in floats.parquet holds double"):
        open_source("parquet", str(tmp_path / "floats.parquet"))
    with pytest.raises(ValueError, match=r"^label_column: 'label' in nulls.parquet has 2 missing"):
        open_source("parquet", str(tmp_path / "nulls.parquet"))
    unlabelled = open_source("parquet", str(tmp_path / "text.parquet"), label_column=None)
    assert unlabelled.n_classes is None and unlabelled.train[0][1] is None


def test_class_names_come_from_folders_parquet_metadata_or_the_config(tmp_path, imagefolder,
                                                                     digits):
    assert open_source("digits").class_names is None  # (its labels are its names)
    assert open_source("imagefolder", str(imagefolder)).class_names == \
        [f"class_{d}" for d in range(10)]
    dogs = tmp_path / "dogs"
    for folder in ("n02085620-Chihuahua", "n02085782-Japanese_spaniel"):
        (dogs / folder).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(digits[0][i]).save(dogs / folder / f"{i}.png")
    assert open_source("imagefolder", str(dogs)).class_names == ["Chihuahua", "Japanese_spaniel"]
    images, labels = digits
    table = pa.table({"image": [_jpeg(images[r]) for r in range(30)],
                      "label": [int(labels[r]) for r in range(30)]})
    names = [f"digit {d}" for d in range(10)]
    for key, text in (("classes", ",".join(names)), ("names", json.dumps(names))):
        folder = tmp_path / key
        folder.mkdir()
        pq.write_table(table.replace_schema_metadata({key: text}), folder / "part.parquet")
    assert open_source("parquet", str(tmp_path / "classes")).class_names == names
    assert open_source("parquet", str(tmp_path / "names"), class_names="names").class_names == \
        names
    assert open_source("parquet", str(tmp_path / "names")).class_names is None  # no "classes"
    given = open_source("parquet", str(tmp_path / "names"), class_names=list("abcdefghij"))
    assert given.class_names == list("abcdefghij")
    with pytest.raises(ValueError, match="^class_names: no key 'labels' in the Parquet schema"):
        open_source("parquet", str(tmp_path / "names"), class_names="labels")
    with pytest.raises(ValueError, match="^class_names: 3 names for 10 classes"):
        open_source("parquet", str(tmp_path / "names"), class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="^class_names: a metadata key"):
        open_source("digits", class_names="classes")
