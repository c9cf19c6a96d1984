"""Dataset sources (ImageFolder, npz, idx, torchvision) and the image loader for extraction."""

from __future__ import annotations

from pipeline.config.extract_config import DataConfig
from pipeline.data.arrays import idx_split, npz_split
from pipeline.data.image_folder import image_folder_split
from pipeline.data.source import CorruptImageError, SplitSource, read_image, stratified_prefix
from pipeline.data.torchvision_source import torchvision_split
from pipeline.data.valid_samples import require_valid_samples


def open_split(cfg: DataConfig, split: str) -> SplitSource:
    """The split as configured, limited to its deterministic subset."""
    if cfg.kind == "image_folder":
        source = image_folder_split(cfg.root, split)
    elif cfg.kind == "npz":
        source = npz_split(cfg.root, split)
    elif cfg.kind == "idx":
        source = idx_split(cfg.root, split, cfg.split_files.get(split))
    else:
        source = torchvision_split(cfg.name, cfg.root, split, cfg.download)
    limit = cfg.limit_for(split)
    if limit is not None and limit < len(source):
        source = source.subset(stratified_prefix(source.labels, limit))
    return source


__all__ = ["open_split", "SplitSource", "CorruptImageError", "read_image", "require_valid_samples"]
