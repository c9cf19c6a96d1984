"""ImageFolder trees: ROOT/SPLIT/CLASS/*.jpg (any extension PIL reads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.source import CorruptImageError, SplitSource, to_rgb

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


def image_folder_split(root: str | Path, split: str) -> SplitSource:
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        present = sorted(p.name for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
        raise FileNotFoundError(
            f"data.root: split folder {str(split_dir)!r} does not exist"
            + (f"; splits present: {present}" if present else f"; {str(root)!r} is not a directory")
        )
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{str(split_dir)!r} has no class folders (expected SPLIT/CLASS/*.jpg)")
    ids, labels, sizes = [], [], []
    for label, cls in enumerate(classes):
        for f in sorted((split_dir / cls).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                ids.append(f"{cls}/{f.name}")
                labels.append(label)
                sizes.append(f.stat().st_size)
    if not ids:
        raise FileNotFoundError(f"{str(split_dir)!r} holds no images with suffixes {sorted(IMAGE_SUFFIXES)}")

    def load(i: int) -> Image.Image:
        path = split_dir / ids[i]
        try:
            with Image.open(path) as img:
                img.load()  # decode now, so a truncated file fails here and not later
                return to_rgb(img)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            raise CorruptImageError(f"cannot read image {str(path)!r}: {e}") from e

    # File sizes stand in for content (hashing every image would cost a full read).
    content = ",".join(map(str, sizes))
    return SplitSource(split, ids, np.asarray(labels, dtype=np.int64), classes, load, content_hash=content)
