"""A split of a dataset as an ordered list of samples: ids, labels, and a way to load each image.

Every source fixes its sample order at construction (sorted files, array order), so a
resumed extraction and a fresh one see the same sample at the same index; the fingerprint
pins that order down so a store refuses a dataset that has changed.

Decoding is in one place (`read_image`, `to_rgb`), shared by extraction and `predict`: an
image either becomes the RGB picture a viewer would show, or a CorruptImageError naming the
file. It never becomes a plausible-looking wrong picture (a 16-bit PNG clipped to white).
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from cache import ConfigError, FeatureCacheError


class CorruptImageError(FeatureCacheError):
    """An image that cannot be decoded, or has no defined RGB meaning; the message names the sample."""


# What Pillow raises for a file it cannot decode (its own Image.open treats SyntaxError,
# IndexError, TypeError and struct.error from a plugin as "not this format"), plus its
# decompression-bomb guard: more than 2 x Image.MAX_IMAGE_PIXELS pixels.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error, Image.DecompressionBombError)

# 16-bit grayscale (PNG, TIFF): scaled to 8 bits, value * 255 / 65535 rounded.
GRAY16_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
# Modes with an alpha channel: composited over white, as a browser shows them on a page.
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
# Modes whose values have no fixed range, so no 8-bit RGB picture can be derived without guessing.
NO_RANGE_MODES = {"I": "32-bit integer", "F": "32-bit float", "I;16S": "signed 16-bit", "I;32": "32-bit integer",
                  "I;32S": "signed 32-bit integer", "I;32B": "32-bit integer", "I;32BS": "signed 32-bit integer"}


def read_image(path: str | Path) -> Image.Image:
    """Open, fully decode and convert one image file to RGB; CorruptImageError names the file."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise CorruptImageError(f"cannot read image {str(path)!r}: broken symbolic link to {os.readlink(path)!r}")
    return _decoded(path, repr(str(path)))


def decode_image(data: bytes, name: str) -> Image.Image:
    """`read_image` for an encoded image held in memory (a tar member, a dataset cell); `name`
    says which sample in the error."""
    return _decoded(io.BytesIO(data), f"of {name}")


def _decoded(source, what: str) -> Image.Image:
    try:
        with Image.open(source) as img:
            img.load()  # decode now, so a truncated file fails here and not later
            return to_rgb(img)
    except DECODE_ERRORS as e:
        raise CorruptImageError(f"cannot read image {what}: {type(e).__name__}: {e}") from e


def class_indices(labels: np.ndarray, what: str, hint: str = "") -> np.ndarray:
    """Labels as int64 class indices: integers, or floats that hold whole numbers (a float
    with a fraction would be truncated to another class); anything else is refused."""
    labels = np.asarray(labels)
    if labels.dtype.kind == "f" and np.array_equal(labels, np.round(labels)):
        return labels.astype(np.int64)
    if labels.dtype.kind not in "iub":
        raise ConfigError(f"{what} are {labels.dtype}, not class indices: give integers (or whole numbers){hint}")
    return labels.astype(np.int64)


def class_names(labels: np.ndarray, given: Optional[Sequence[str]], declared: Optional[Sequence[str]],
                sample: Callable[[int], str]) -> list[str]:
    """The class names of a split whose samples carry integer labels: `data.classes` when given,
    else the dataset's own (`declared`), else "0".."max". Every label must index them: a
    ConfigError names the first `sample(i)` that does not (an unlabeled -1 would be stored,
    and scored as a wrong answer). `data.classes` may name a dataset's classes that it does not
    name itself; where it does, they must agree (given in another order, every label would be
    stored under the wrong name, and the check that the splits agree would pass)."""
    if given and declared and list(given) != list(declared):
        raise ConfigError(f"data.classes: got {list(given)}, but the data names its classes {list(declared)} (label i is the "
                          "i-th name); remove data.classes, or give exactly these")
    if given:
        names = list(given)
    elif declared:
        names = list(declared)
    else:
        names = [str(c) for c in range(int(labels.max()) + 1 if len(labels) else 0)]
    bad = np.flatnonzero((labels < 0) | (labels >= len(names)))
    if len(bad):
        i = int(bad[0])
        raise ConfigError(f"{sample(i)} has label {int(labels[i])}, not a class index in [0, {len(names)}) "
                          f"({len(bad)} such sample(s)); unlabeled samples cannot be stored, and data.classes must name every class")
    return names


def to_rgb(image: Image.Image) -> Image.Image:
    """The RGB picture of any Pillow mode, or ValueError for a mode without one.

    - RGB without transparency: as is. L, 1, P, CMYK, YCbCr, HSV, RGBX: Pillow's conversion.
    - 16-bit grayscale (I;16*, and mode I from a PNG, which is how Pillow < 11 opens 16-bit
      grayscale PNGs): v -> round(v * 255 / 65535), the same value in R, G and B.
    - Alpha (RGBA, LA, PA, P or RGB/L with a transparency entry): composited over white.
    - I (32-bit, not PNG), F (float) and other integer modes: refused, since their range is unknown.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in GRAY16_MODES or (mode == "I" and image.format == "PNG"):
        return _gray16_to_rgb(image)
    if mode in NO_RANGE_MODES:
        raise ValueError(f"mode {mode} ({NO_RANGE_MODES[mode]} pixels) has no defined range to map to 8-bit RGB; "
                         "save it as an 8- or 16-bit image")
    if mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _gray16_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.int64)
    if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
        raise ValueError(f"mode {image.mode}: values outside 0..65535 in a 16-bit grayscale image")
    gray = ((2 * values + 257) // 514).astype(np.uint8)  # round(v / 257) = round(v * 255 / 65535); no ties
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1), mode="RGB")


@dataclass
class SplitSource:
    split: str
    sample_ids: list[str]
    labels: np.ndarray  # int64 [N]
    classes: list[str]
    # Loads sample i as an RGB PIL image; raises CorruptImageError naming the file.
    load: Callable[[int], Image.Image]
    # What identifies the content beyond ids and labels (e.g. sha256 of an array file).
    content_hash: str = ""
    # Per-sample content stamps (image files: size and mtime), hashed with each id and label.
    sample_stamps: Optional[list[str]] = None
    # What the stamps are, stated in the fingerprint (so a mismatch says what was compared).
    stamps_cover: str = ""
    # A stream: samples load only in increasing order, in one process (no loader workers).
    sequential: bool = False
    # The files the split reads, one spelling each (webdataset: its shards): two splits must
    # not share one, or their samples would be in both.
    origins: list[str] = field(default_factory=list)
    # Paths under the split's folder that are not samples (stray files, nested folders,
    # non-image files, hidden files), relative to the split folder; folders end in "/".
    ignored: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def fingerprint(self) -> dict:
        h = hashlib.sha256()
        stamps = self.sample_stamps
        for k, (sid, label) in enumerate(zip(self.sample_ids, self.labels.tolist())):
            h.update((f"{sid}\t{label}\n" if stamps is None else f"{sid}\t{label}\t{stamps[k]}\n").encode())
        h.update(self.content_hash.encode())
        out = {
            "num_samples": len(self),
            "classes": list(self.classes),
            "samples_sha256": h.hexdigest(),
        }
        if self.stamps_cover:
            out["content"] = self.stamps_cover
        return out

    def subset(self, indices: np.ndarray) -> "SplitSource":
        base_load = self.load
        idx = np.asarray(indices, dtype=np.int64)
        return SplitSource(
            split=self.split,
            sample_ids=[self.sample_ids[i] for i in idx],
            labels=self.labels[idx],
            classes=self.classes,
            load=lambda i: base_load(int(idx[i])),
            content_hash=self.content_hash,
            sample_stamps=None if self.sample_stamps is None else [self.sample_stamps[i] for i in idx],
            stamps_cover=self.stamps_cover,
            sequential=self.sequential,  # indices are sorted: a stream still reads forward
            origins=self.origins,
            ignored=self.ignored,
        )


def stratified_prefix(labels: np.ndarray, limit: Optional[int]) -> np.ndarray:
    """The first `limit` samples taking classes in turn, returned in original order.

    A plain prefix of a class-sorted ImageFolder would hold one class only; this keeps the
    classes balanced and is deterministic, so the subset is part of the fingerprint.
    """
    n = len(labels)
    if limit is None or limit >= n:
        return np.arange(n)
    per_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    picked: list[int] = []
    rank = 0
    while len(picked) < limit:
        for members in per_class:
            if rank < len(members) and len(picked) < limit:
                picked.append(int(members[rank]))
        rank += 1
    return np.sort(np.asarray(picked, dtype=np.int64))
