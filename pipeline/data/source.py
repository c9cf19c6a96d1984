"""A split of a dataset as an ordered list of samples: ids, labels, and a way to load each image.

Every source fixes its sample order at construction (sorted files, array order), so a
resumed extraction and a fresh one see the same sample at the same index; the fingerprint
pins that order down so a store refuses a dataset that has changed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from PIL import Image


class CorruptImageError(RuntimeError):
    """An image that cannot be decoded; the message names the sample."""


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

    def __len__(self) -> int:
        return len(self.sample_ids)

    def fingerprint(self) -> dict:
        h = hashlib.sha256()
        for sid, label in zip(self.sample_ids, self.labels.tolist()):
            h.update(f"{sid}\t{label}\n".encode())
        h.update(self.content_hash.encode())
        return {
            "num_samples": len(self),
            "classes": list(self.classes),
            "samples_sha256": h.hexdigest(),
        }

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


def to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")
