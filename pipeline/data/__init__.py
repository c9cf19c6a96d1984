"""Dataset sources (ImageFolder, npz, idx, torchvision) and the image loader for extraction.

`DATA_SOURCES` is the registry of `data.kind` values: what each reads, and how a split is
opened. `python -m pipeline list` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from pipeline.data.arrays import idx_split, npz_split
from pipeline.data.image_folder import image_folder_split
from pipeline.data.source import CorruptImageError, SplitSource, read_image, stratified_prefix
from pipeline.data.torchvision_source import torchvision_split
from pipeline.data.valid_samples import require_valid_samples

if TYPE_CHECKING:  # the config imports DATA_SOURCES: its data.kind choices are the names below
    from pipeline.config.extract_config import DataConfig


@dataclass(frozen=True)
class DataSourceKind:
    description: str  # what `data.root` holds, one line
    open: Callable[[DataConfig, str], SplitSource]  # (config, split) -> the whole split
    needs_name: bool = False  # data.name is required (the dataset's class name)


DATA_SOURCES: dict[str, DataSourceKind] = {
    "image_folder": DataSourceKind("ROOT/SPLIT/CLASS/*.jpg (any image suffix Pillow reads)",
                                   lambda cfg, split: image_folder_split(cfg.root, split)),
    "npz": DataSourceKind("ROOT/SPLIT.npz with arrays images [N,H,W(,C)] uint8 and labels [N] (classes optional)",
                          lambda cfg, split: npz_split(cfg.root, split)),
    "idx": DataSourceKind("MNIST-style ROOT/PREFIX-images-idx3-ubyte(.gz) and -labels-idx1-ubyte(.gz); "
                          "split_files maps a split to its PREFIX (test: t10k)",
                          lambda cfg, split: idx_split(cfg.root, split, cfg.split_files.get(split))),
    "torchvision": DataSourceKind("a torchvision dataset by class name (data.name, e.g. CIFAR10), kept under ROOT; "
                                  "data.download fetches it",
                                  lambda cfg, split: torchvision_split(cfg.name, cfg.root, split, cfg.download), needs_name=True),
}


def open_split(cfg: DataConfig, split: str) -> SplitSource:
    """The split as configured, limited to its deterministic subset."""
    source = DATA_SOURCES[cfg.kind].open(cfg, split)  # data.kind is one of DATA_SOURCES (the config checks it)
    limit = cfg.limit_for(split)
    if limit is not None and limit < len(source):
        source = source.subset(stratified_prefix(source.labels, limit))
    return source


__all__ = ["DATA_SOURCES", "DataSourceKind", "open_split", "SplitSource", "CorruptImageError", "read_image", "require_valid_samples"]
