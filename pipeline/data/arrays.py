"""In-memory image arrays: .npz files (SPLIT.npz with `images`, `labels`) and MNIST-style idx files.

Fashion-MNIST (Debian's dataset-fashion-mnist) is read from its idx .gz files directly.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from cache import ConfigError
from pipeline.data.source import SplitSource, to_rgb

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _array_source(split: str, images: np.ndarray, labels: np.ndarray, classes: list[str], content_hash: str) -> SplitSource:
    if images.ndim not in (3, 4) or images.dtype != np.uint8:
        raise ConfigError(f"split {split!r}: images must be uint8 [N,H,W] or [N,H,W,C], got {images.dtype} {images.shape}")
    if len(images) != len(labels):
        raise ConfigError(f"split {split!r}: {len(images)} images but {len(labels)} labels")

    def load(i: int) -> Image.Image:
        return to_rgb(Image.fromarray(images[i]))

    ids = [f"{split}:{i}" for i in range(len(images))]
    return SplitSource(split, ids, labels.astype(np.int64), classes, load, content_hash=content_hash)


def npz_split(root: str | Path, split: str) -> SplitSource:
    path = Path(root) / f"{split}.npz"
    if not path.is_file():
        raise ConfigError(f"data.root: {str(path)!r} does not exist (expected ROOT/SPLIT.npz)")
    with np.load(path, allow_pickle=False) as z:
        missing = {"images", "labels"} - set(z.files)
        if missing:
            raise ConfigError(f"{str(path)!r} lacks arrays {sorted(missing)}; it has {z.files}")
        images, labels = z["images"], z["labels"]
        classes = [str(c) for c in z["classes"]] if "classes" in z.files else [str(c) for c in range(int(labels.max()) + 1)]
    return _array_source(split, images, labels, classes, _sha256(path))


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


def idx_split(root: str | Path, split: str, file_prefix: str | None = None) -> SplitSource:
    """MNIST-style idx files; `file_prefix` maps a split to its files ("test" -> "t10k")."""
    root = Path(root)
    prefix = file_prefix or {"test": "t10k"}.get(split, split)
    images_path, labels_path = _find(root, prefix, "images"), _find(root, prefix, "labels")
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    classes = FASHION_MNIST_CLASSES if "fashion" in str(root).lower() else [str(c) for c in range(int(labels.max()) + 1)]
    content = _sha256(images_path) + _sha256(labels_path)
    return _array_source(split, images, labels, classes, content)
