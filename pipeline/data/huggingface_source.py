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
- Not yet: streaming (`load_dataset(..., streaming=True)`) for data sets larger than the
  disk cache; a split is opened as an Arrow table (memory-mapped, so not read into RAM).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from cache import ConfigError, require_extra
from pipeline.data.source import CorruptImageError, SplitSource, decode_image


def _load(root: str):
    import datasets

    path = Path(root)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return datasets.load_from_disk(str(path))
    return datasets.load_dataset(root)


def huggingface_split(root: str, split: str, image_column: str, label_column: str, classes: Optional[list[str]]) -> SplitSource:
    require_extra("data.kind huggingface", "hf", "datasets")
    import datasets

    try:
        loaded = _load(root)
    except FileNotFoundError as e:
        raise ConfigError(f"data.root: {root!r} is neither a dataset saved with save_to_disk nor one load_dataset finds: {e}") from e
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ConfigError(f"data.splits: {split!r} is not a split of {root!r}; it has {sorted(loaded)}")
        ds = loaded[split]
    else:
        ds = loaded  # a single Dataset saved without splits: every configured split name reads it
    missing = [c for c in (image_column, label_column) if c not in ds.column_names]
    if missing:
        raise ConfigError(f"data.image_column / data.label_column: split {split!r} of {root!r} has no column "
                          f"{', '.join(map(repr, missing))}; it has {ds.column_names}")
    feature = ds.features[label_column]
    labels = np.asarray(ds[label_column], dtype=np.int64)
    if classes:
        names = list(classes)
    elif isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    else:
        names = [str(c) for c in range(int(labels.max()) + 1 if len(labels) else 0)]
    images = ds.select_columns([image_column])
    if isinstance(images.features[image_column], datasets.Image):
        images = images.cast_column(image_column, datasets.Image(decode=False))  # {"bytes", "path"}: we decode

    def load(i: int):
        name = f"row {i} of split {split!r} of {root!r}"
        value = images[i][image_column]
        if isinstance(value, dict):
            if value.get("bytes") is None and value.get("path") is None:
                raise CorruptImageError(f"{name}: column {image_column!r} is empty")
            try:
                value = value["bytes"] if value.get("bytes") is not None else Path(value["path"]).read_bytes()
            except OSError as e:
                raise CorruptImageError(f"{name}: cannot read {value['path']!r}: {e}") from e
        if not isinstance(value, (bytes, bytearray)):
            raise CorruptImageError(f"{name}: column {image_column!r} holds {type(value).__name__}, not an encoded image")
        return decode_image(bytes(value), name)

    ids = [f"{split}:{i}" for i in range(len(ds))]
    return SplitSource(split, ids, labels, names, load, content_hash=f"datasets:{ds._fingerprint}",
                       stamps_cover="the dataset's own fingerprint (datasets' hash of its data and history)")
