"""Dataset sources (ImageFolder, npz, idx, torchvision, WebDataset shards, Hugging Face datasets)
and the image loader for extraction.

`DATA_SOURCES` is the registry of `data.kind` values: what each reads, and how a split is
opened. `python -m pipeline list` prints it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from pipeline.data.arrays import idx_split, npz_split
from pipeline.data.huggingface_source import huggingface_split
from pipeline.data.image_folder import image_folder_split
from pipeline.data.source import CorruptImageError, SplitSource, read_image, stratified_prefix
from pipeline.data.torchvision_source import torchvision_split
from pipeline.data.valid_samples import require_valid_samples
from pipeline.data.webdataset_source import webdataset_split

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # the config imports DATA_SOURCES: its data.kind choices are the names below
    from pipeline.config.extract_config import DataConfig


@dataclass(frozen=True)
class DataSourceKind:
    description: str  # what `data.root` holds, one line
    open: Callable[[DataConfig, str], SplitSource]  # (config, split) -> the whole split
    needs_name: bool = False  # data.name is required (the dataset's class name)
    reads: tuple[str, ...] = ()  # the kind-specific data.* keys it reads (KIND_KEYS); another one set is refused


# The data.* keys that only some kinds read: set for a kind that does not read it, a key was
# ignored without a word (image_column on an idx source, say).
KIND_KEYS = ("classes", "split_files", "name", "download", "shards", "image_key", "label_key", "image_column", "label_column",
             "streaming", "storage_options")

DATA_SOURCES: dict[str, DataSourceKind] = {
    "image_folder": DataSourceKind("ROOT/SPLIT/CLASS/*.jpg (any image suffix Pillow reads); its class folders name the classes",
                                   lambda cfg, split: image_folder_split(cfg.root, split)),
    "npz": DataSourceKind("ROOT/SPLIT.npz with arrays images [N,H,W(,C)] uint8 and labels [N] (classes optional)",
                          lambda cfg, split: npz_split(cfg.root, split, cfg.classes), reads=("classes",)),
    "idx": DataSourceKind("MNIST-style ROOT/PREFIX-images-idx3-ubyte(.gz) and -labels-idx1-ubyte(.gz); "
                          "split_files maps a split to its PREFIX (test: t10k)",
                          lambda cfg, split: idx_split(cfg.root, split, cfg.split_files.get(split), cfg.classes),
                          reads=("classes", "split_files")),
    "torchvision": DataSourceKind("a torchvision dataset by class name (data.name, e.g. CIFAR10), kept under ROOT; "
                                  "data.download fetches it",
                                  lambda cfg, split: torchvision_split(cfg.name, cfg.root, split, cfg.download, cfg.classes), needs_name=True,
                                  reads=("classes", "name", "download")),
    "webdataset": DataSourceKind("WebDataset tar shards per split (data.shards: a brace pattern or a list, under ROOT or URLs), "
                                 "image and label members by data.image_key / data.label_key (extra: webdataset)",
                                 lambda cfg, split: webdataset_split(cfg.root, cfg.shards[split], split, cfg.image_key, cfg.label_key,
                                                                     cfg.classes, cfg.storage_options),
                                 reads=("classes", "shards", "image_key", "label_key", "storage_options")),
    "huggingface": DataSourceKind("a datasets dataset: ROOT saved with save_to_disk, a folder load_dataset reads (Parquet...), "
                                  "or a hub name; columns data.image_column / data.label_column (extra: hf)",
                                  lambda cfg, split: huggingface_split(cfg.root, split, cfg.image_column, cfg.label_column, cfg.classes,
                                                                       cfg.streaming),
                                  reads=("classes", "image_column", "label_column", "streaming")),
}


def open_split(cfg: DataConfig, split: str) -> SplitSource:
    """The split as configured, limited to its deterministic subset."""
    source = DATA_SOURCES[cfg.kind].open(cfg, split)  # data.kind is one of DATA_SOURCES (the config checks it)
    limit = cfg.limit_for(split)
    if limit is not None and limit < len(source):
        present = len(np.unique(source.labels))
        source = source.subset(stratified_prefix(source.labels, limit))
        if limit < present:  # a subset this small leaves classes out: train would never see them
            log.warning("data.limit: %d sample(s) of split %s leave %d of its %d classes without a sample", limit, split,
                        present - limit, present)
    return source


__all__ = ["DATA_SOURCES", "DataSourceKind", "KIND_KEYS", "open_split", "SplitSource", "CorruptImageError", "read_image", "require_valid_samples"]
