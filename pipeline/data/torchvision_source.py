"""torchvision datasets by class name (CIFAR10, FashionMNIST, ...), with their own download flag."""

from __future__ import annotations

import inspect

import numpy as np
from PIL import Image

from cache import ConfigError
from pipeline.data.source import DECODE_ERRORS, CorruptImageError, SplitSource, to_rgb


def torchvision_split(name: str, root: str, split: str, download: bool) -> SplitSource:
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if cls is None or not inspect.isclass(cls):
        known = sorted(n for n in dir(tvd) if n[0].isupper() and inspect.isclass(getattr(tvd, n)))
        raise ConfigError(f"data.name: {name!r} is not a torchvision dataset; known: {', '.join(known)}")
    params = inspect.signature(cls).parameters
    # Datasets take either train=bool or split=str; map our split names onto that.
    if "train" in params:
        ds = cls(root=root, train=(split == "train"), download=download)
    else:
        ds = cls(root=root, split=split, download=download)
    targets = getattr(ds, "targets", None)
    labels = np.asarray(targets if targets is not None else [ds[i][1] for i in range(len(ds))], dtype=np.int64)
    classes = [str(c) for c in getattr(ds, "classes", range(int(labels.max()) + 1))]

    def load(i: int) -> Image.Image:
        try:
            image = ds[i][0]
            return to_rgb(image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)))
        except DECODE_ERRORS as e:
            raise CorruptImageError(f"cannot read {name}[{split}][{i}]: {type(e).__name__}: {e}") from e

    ids = [f"{split}:{i}" for i in range(len(ds))]
    return SplitSource(split, ids, labels, classes, load, content_hash=f"torchvision:{name}")
