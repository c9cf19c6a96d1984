"""Turn a split's samples into batches of preprocessed images, without losing track of bad ones.

A corrupt image does not crash a loader worker: the sample comes back as a zero image with
its error message, and the extraction loop decides (fail with the path, or mark it invalid).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.data.augment import SeededView
from pipeline.data.source import CorruptImageError, SplitSource


class ImageDataset(Dataset):
    def __init__(self, source: SplitSource, transform, indices: np.ndarray, image_size: tuple[int, int]):
        self.source = source
        self.transform = transform
        self.indices = np.asarray(indices, dtype=np.int64)
        self.blank = torch.zeros(3, *image_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = int(self.indices[k])
        try:
            image = self.source.load(i)
            # An augmented view is drawn from the sample's index (pipeline/data/augment.py).
            return i, self.transform(image, i) if isinstance(self.transform, SeededView) else self.transform(image), ""
        except CorruptImageError as e:
            return i, self.blank, str(e)


def make_loader(source: SplitSource, transform, indices: np.ndarray, image_size: tuple[int, int], batch_size: int, num_workers: int,
                pin_memory: bool) -> DataLoader:
    # Order is kept (no shuffle): the writer fills chunks front to back.
    num_workers = 0 if source.sequential else num_workers  # a stream is read in order, here
    return DataLoader(
        ImageDataset(source, transform, indices, image_size),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
