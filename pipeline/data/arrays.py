"""In-memory image arrays: .npz files (SPLIT.npz with `images`, `labels`) and MNIST-style idx files.

Fashion-MNIST (Debian's dataset-fashion-mnist) is read from its idx .gz files directly; idx
files carry no class names, so they come from `data.classes` (configs/fashion_mnist_lite0.yaml
gives Fashion-MNIST's), else "0".."max".
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from cache import ConfigError
from pipeline.data.source import SplitSource, class_indices, class_names, to_rgb


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _array_source(split: str, images: np.ndarray, labels: np.ndarray, given: Optional[Sequence[str]], declared: Optional[list[str]],
                  content_hash: str, where: str) -> SplitSource:
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]  # [N, H, W, 1] (Keras's layout for grayscale): one channel, as [N, H, W]
    if images.ndim not in (3, 4) or images.dtype != np.uint8 or (images.ndim == 4 and images.shape[-1] not in (3, 4)):
        raise ConfigError(f"{where}: images must be uint8 [N,H,W], [N,H,W,1], [N,H,W,3] (RGB) or [N,H,W,4] (RGBA), "
                          f"got {images.dtype} {list(images.shape)}")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]  # [N, 1] (Keras's CIFAR layout)
    if labels.ndim != 1:
        raise ConfigError(f"{where}: labels must be [N] or [N, 1], got {list(labels.shape)}")
    if len(images) != len(labels):
        raise ConfigError(f"{where}: {len(images)} images but {len(labels)} labels")
    labels = class_indices(labels, f"{where}: labels")
    classes = class_names(labels, given, declared, lambda i: f"sample {i} of {where}")

    def load(i: int) -> Image.Image:
        return to_rgb(Image.fromarray(images[i]))

    ids = [f"{split}:{i}" for i in range(len(images))]
    return SplitSource(split, ids, labels, classes, load, content_hash=content_hash)


def npz_split(root: str | Path, split: str, given: Optional[Sequence[str]]) -> SplitSource:
    """`given`: data.classes, which must equal the file's own `classes` array where it has one."""
    path = Path(root) / f"{split}.npz"
    if not path.is_file():
        raise ConfigError(f"data.root: {str(path)!r} does not exist (expected ROOT/SPLIT.npz)")
    with np.load(path, allow_pickle=False) as z:
        missing = {"images", "labels"} - set(z.files)
        if missing:
            raise ConfigError(f"{str(path)!r} lacks arrays {sorted(missing)}; it has {z.files}")
        images, labels = z["images"], z["labels"]
        declared = [str(c) for c in z["classes"]] if "classes" in z.files else None
    return _array_source(split, images, labels, given, declared, _sha256(path), repr(str(path)))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte payload
        raise ConfigError(f"{str(path)!r} is not a uint8 idx file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(root: Path, prefix: str, kind: str) -> Path:
    for name in (f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte", ):
        for candidate in (root / f"{name}.gz", root / name):
            if candidate.is_file():
                return candidate
    raise ConfigError(f"data.root: no {prefix}-{kind}-idx*-ubyte(.gz) file in {str(root)!r}")


def idx_split(root: str | Path, split: str, file_prefix: str | None, given: Optional[Sequence[str]]) -> SplitSource:
    """MNIST-style idx files; `file_prefix` maps a split to its files ("test" -> "t10k");
    `given`: data.classes (idx files name no classes)."""
    root = Path(root)
    prefix = file_prefix or {"test": "t10k"}.get(split, split)
    images_path, labels_path = _find(root, prefix, "images"), _find(root, prefix, "labels")
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    content = _sha256(images_path) + _sha256(labels_path)
    return _array_source(split, images, labels, given, None, content, repr(str(images_path)))
