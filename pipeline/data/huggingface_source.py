"""A Hugging Face `datasets` split: saved with save_to_disk, Parquet/other files, or a hub name.

`data.root` is a folder written by `save_to_disk` (read with `load_from_disk`), or anything
`load_dataset` takes: a local folder of Parquet/Arrow/image files, or a hub name (which needs
a network, or the hub cache). Each of `data.splits` is a split of the dataset. Samples keep
the dataset's row order; a sample's id is `<split>:<row>`.

- `data.image_column` (default `image`): an `Image` feature or raw encoded bytes, decoded as
  image files are (`pipeline.data.source.decode_image`; datasets' own decoding would also
  apply EXIF rotation, which the other sources do not); `data.label_column` (default
  `label`): a `ClassLabel` gives the class names, any integer column works (names "0".."max",
  or `data.classes`). A missing column is refused, naming what the split has.
- Fingerprint: the dataset's own `_fingerprint` (datasets' hash of its data and the
  transforms that made it), the split's row count, and every label.
- `data.streaming: true` (not for save_to_disk folders): `load_dataset(..., streaming=True)`,
  for data sets larger than the disk cache. Opening a split streams its label column once
  (with Parquet, only that column's bytes are read) for the labels and the sample count;
  images are then read in one forward pass, in the extraction's own process (a stream has no
  random access, so no loader workers), and a resumed run streams past the samples of the
  chunks already stored without decoding them. Its fingerprint is the dataset builder's hash
  (datasets' hash of the data files with their modification times or hub ETags), the split,
  and every label.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from cache import ConfigError, require_extra
from pipeline.data.source import CorruptImageError, SplitSource, class_indices, class_names, decode_image


def _saved_to_disk(root: str) -> bool:
    return (Path(root) / "dataset_dict.json").is_file() or (Path(root) / "state.json").is_file()


def _load(root: str):
    import datasets

    return datasets.load_from_disk(root) if _saved_to_disk(root) else datasets.load_dataset(root)


def huggingface_split(root: str, split: str, image_column: str, label_column: str, classes: Optional[list[str]],
                      streaming: bool = False) -> SplitSource:
    require_extra("data.kind huggingface", "hf", "datasets")
    if streaming:
        return _streaming_split(root, split, image_column, label_column, classes)
    import datasets

    try:
        loaded = _load(root)
    except FileNotFoundError as e:
        raise ConfigError(f"data.root: {root!r} is neither a dataset saved with save_to_disk nor one load_dataset finds: {e}") from e
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ConfigError(f"data.splits: {split!r} is not a split of {root!r}; it has {sorted(loaded)}")
        ds = loaded[split]
    elif split == "train":
        ds = loaded  # a single Dataset saved without splits: it is the train split, and only that
    else:
        raise ConfigError(f"data.splits: {root!r} is one dataset saved without splits; it can only be split 'train' "
                          f"(save a DatasetDict for {split!r}), or every split would read the same rows")
    _check_columns(ds.column_names, root, split, image_column, label_column)
    where = f"split {split!r} of {root!r}"
    labels = _labels(ds[label_column], label_column, where)
    names = _class_names(ds.features[label_column], labels, classes, where)
    images = _undecoded(ds.select_columns([image_column]), image_column)
    stamps = _referenced_files(images, image_column, where)
    return SplitSource(split, [f"{split}:{i}" for i in range(len(ds))], labels, names,
                       lambda i: _decode_cell(images[i][image_column], f"row {i} of {where}", image_column),
                       content_hash=f"datasets:{ds._fingerprint}:{image_column}", sample_stamps=stamps,
                       stamps_cover="the dataset's own fingerprint (datasets' hash of its data and history) and the image column"
                                    + ("; for cells that hold a file path, that file's size and mtime_ns" if stamps else ""))


def _streaming_split(root: str, split: str, image_column: str, label_column: str, classes: Optional[list[str]]) -> SplitSource:
    import datasets

    if _saved_to_disk(root):
        raise ConfigError(f"data.streaming: {root!r} was written by save_to_disk, which is read memory-mapped, never streamed; "
                          "set data.streaming: false")
    try:
        builder = datasets.load_dataset_builder(root)
    except FileNotFoundError as e:
        raise ConfigError(f"data.root: {root!r} is not a dataset load_dataset finds: {e}") from e
    splits = sorted(builder.config.data_files or {})
    if split not in splits:
        raise ConfigError(f"data.splits: {split!r} is not a split of {root!r}; it has {splits}")
    ds = datasets.load_dataset(root, split=split, streaming=True)
    if ds.features is None:
        raise ConfigError(f"data.streaming: the files of {root!r} do not declare their columns (Parquet and Arrow do); "
                          "stream those, or set data.streaming: false")
    _check_columns(list(ds.features), root, split, image_column, label_column)
    where = f"split {split!r} of {root!r}"
    labels = _labels([row[label_column] for row in ds.select_columns([label_column])], label_column, where)  # the labels pass
    names = _class_names(ds.features[label_column], labels, classes, where)
    # Files the builder's hash covers (an image folder's images are its data files): a cell may point to those.
    covered = frozenset(os.path.realpath(str(f)) for f in builder.config.data_files[split])
    stream = _StreamCursor(_undecoded(ds.select_columns([image_column]), image_column), image_column, where, covered)
    return SplitSource(split, [f"{split}:{i}" for i in range(len(labels))], labels, names,
                       stream.load, content_hash=f"datasets-builder:{builder.hash}:{image_column}",
                       stamps_cover="the dataset builder's hash (its data files with their mtimes or ETags) and the image column",
                       sequential=True)


class _StreamCursor:
    """Row i of a stream, for reads in increasing order (as extraction asks): one pass over
    the stream, skipping forward past rows not asked for; an earlier row restarts it."""

    def __init__(self, stream, column: str, where: str, covered: frozenset[str]):
        self.stream, self.column, self.where, self.covered = stream, column, where, covered
        self.rows, self.next = None, 0

    def load(self, i: int):
        if self.rows is None or i < self.next:
            self.rows, self.next = iter(self.stream), 0
        for _ in range(i - self.next):
            next(self.rows)
        self.next = i + 1
        return _decode_cell(next(self.rows)[self.column], f"row {i} of {self.where}", self.column, covered=self.covered)


def _check_columns(columns: list[str], root: str, split: str, image_column: str, label_column: str) -> None:
    missing = [c for c in (image_column, label_column) if c not in columns]
    if missing:
        raise ConfigError(f"data.image_column / data.label_column: split {split!r} of {root!r} has no column "
                          f"{', '.join(map(repr, missing))}; it has {list(columns)}")


def _labels(values, label_column: str, where: str) -> np.ndarray:
    """The label column as class indices; strings, fractions or missing values are refused (a
    fraction would be truncated to another class)."""
    return class_indices(values, f"data.label_column: the values of column {label_column!r} of {where}",
                         "; for class names, make it a ClassLabel (datasets' class_encode_column)")


def _referenced_files(images, image_column: str, where: str) -> Optional[list[str]]:
    """Per row, the size and mtime_ns of the file an image cell holds only the path of ("" for
    a cell with its bytes); None when every cell holds its bytes. The dataset's fingerprint
    covers the path, not the file: a file changed in place would otherwise go unnoticed. A
    relative path is refused: nothing says what it is relative to (datasets reads it from the
    current directory)."""
    import datasets

    if not isinstance(images.features[image_column], datasets.Image):
        return None
    stamps, any_path = [], False
    for batch in images.with_format("arrow").iter(batch_size=65536):  # the struct's fields only: no image bytes read
        cells = batch[image_column].combine_chunks()
        for data, path in zip(cells.field("bytes").is_null().to_pylist(), cells.field("path").to_pylist()):
            if not data or path is None:
                stamps.append("")
                continue
            any_path = True
            row = len(stamps)
            if not Path(path).is_absolute():
                raise ConfigError(f"data.image_column: row {row} of {where} holds only the relative file path {path!r}, which "
                                  "datasets reads from the current directory; store the images' bytes in the dataset "
                                  "(save_to_disk, or Parquet written with embedded images) or give absolute paths")
            try:
                st = Path(path).stat()
            except OSError as e:
                raise ConfigError(f"data.image_column: row {row} of {where} refers to {path!r}, which cannot be read: {e}") from e
            stamps.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
    return stamps if any_path else None


def _class_names(feature, labels: np.ndarray, classes: Optional[list[str]], where: str) -> list[str]:
    """data.classes, else a ClassLabel's names, else "0".."max" (source.class_names checks every label)."""
    import datasets

    declared = feature.names if isinstance(feature, datasets.ClassLabel) else None
    return class_names(labels, classes, declared, lambda i: f"row {i} of {where}")


def _undecoded(ds, image_column: str):
    """The image column as stored ({"bytes", "path"} for an Image feature): we decode it."""
    import datasets

    if isinstance(ds.features[image_column], datasets.Image):
        return ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


def _decode_cell(value, name: str, image_column: str, covered: Optional[frozenset[str]] = None):
    """covered: for a stream, the files its fingerprint covers (its data files); a cell that
    holds only a path must point to one of them."""
    if isinstance(value, dict):
        if value.get("bytes") is None and value.get("path") is None:
            raise CorruptImageError(f"{name}: column {image_column!r} is empty")
        if value.get("bytes") is None and covered is not None and os.path.realpath(value["path"]) not in covered:
            # a file no fingerprint covers (a split held whole stamps each one it points to)
            raise ConfigError(f"data.streaming: {name} holds only the file path {value['path']!r}, which is none of the stream's "
                              "data files that its fingerprint covers; store the images' bytes, or set data.streaming: false")
        try:
            value = value["bytes"] if value.get("bytes") is not None else Path(value["path"]).read_bytes()
        except OSError as e:
            raise CorruptImageError(f"{name}: cannot read {value['path']!r}: {e}") from e
    if not isinstance(value, (bytes, bytearray)):
        raise CorruptImageError(f"{name}: column {image_column!r} holds {type(value).__name__}, not an encoded image")
    return decode_image(bytes(value), name)
