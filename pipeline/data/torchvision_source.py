"""torchvision datasets by class name (CIFAR10, FashionMNIST, ...), with their own download flag."""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from cache import ConfigError
from pipeline.data.source import DECODE_ERRORS, CorruptImageError, SplitSource, class_indices, class_names, to_rgb


def torchvision_split(name: str, root: str, split: str, download: bool, given: Optional[Sequence[str]]) -> SplitSource:
    """`given`: data.classes, which must equal the dataset's own class names where it has them."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if cls is None or not inspect.isclass(cls):
        known = sorted(n for n in dir(tvd) if n[0].isupper() and inspect.isclass(getattr(tvd, n)))
        raise ConfigError(f"data.name: {name!r} is not a torchvision dataset; known: {', '.join(known)}")
    params = inspect.signature(cls).parameters
    # Datasets take either train=bool or split=str; map our split names onto that.
    if "train" in params:
        if split not in ("train", "test"):  # train=False is the test set: a "val" would be it again
            raise ConfigError(f"data.splits: torchvision's {name} has a train and a test set only; got split {split!r} "
                              "(carve validation from train with `val_fraction` at training time)")
        ds = cls(root=root, train=(split == "train"), download=download)
    else:
        ds = cls(root=root, split=split, download=download)
    targets = getattr(ds, "targets", None)
    labels = class_indices(targets if targets is not None else [ds[i][1] for i in range(len(ds))], f"data.name: {name}[{split}]'s labels")
    declared = getattr(ds, "classes", None)
    classes = class_names(labels, given, None if declared is None else [str(c) for c in declared], lambda i: f"{name}[{split}][{i}]")

    def load(i: int) -> Image.Image:
        try:
            image = ds[i][0]
            return to_rgb(image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)))
        except DECODE_ERRORS as e:
            raise CorruptImageError(f"cannot read {name}[{split}][{i}]: {type(e).__name__}: {e}") from e

    ids = [f"{split}:{i}" for i in range(len(ds))]
    folder = _dataset_folder(ds, Path(root), name)
    return SplitSource(split, ids, labels, classes, load, content_hash=f"torchvision:{name}:{_files_stamp(folder)}",
                       stamps_cover=f"sample index and label, and the size and mtime_ns of every file under {folder}")


def _dataset_folder(ds, root: Path, name: str) -> Path:
    """Where the dataset keeps its own files (one root often holds several datasets, which must
    not move this one's fingerprint): the folder above MNIST's raw_folder (its raw and processed
    files), CIFAR's base_folder, ROOT/NAME, else ROOT."""
    raw = getattr(ds, "raw_folder", None)
    for folder in (Path(raw).parent if raw else None, root / ds.base_folder if isinstance(getattr(ds, "base_folder", None), str) else None,
                   root / name):
        if folder is not None and Path(folder).is_dir():
            return Path(folder)
    return root


def _files_stamp(root: Path) -> str:
    """A hash of every file's path, size and mtime under the dataset's root: the pixels live in
    the dataset's own files (binary batches, idx files), which a changed copy changes."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()
