"""Which samples a training job uses: train, validation (a split, or a seeded carve of the
train split) and test. Shared by the trainer and the benchmark's references, so that every
method sees the same carve."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from cache import CacheReader, ConfigError
from pipeline.config.train_config import TrainingSettings
from pipeline.data.valid_samples import require_valid_samples


@dataclass
class Splits:
    train: str
    train_keep: Optional[np.ndarray]
    val: str
    val_keep: Optional[np.ndarray]
    test: Optional[str]


def resolve_splits(cfg: TrainingSettings, reader: CacheReader) -> Splits:
    """The splits a job trains, validates and tests on, with the seeded validation carve of
    the train split when no val_split is given; unknown splits are listed at once."""
    unknown = [f"{key}: split {getattr(cfg, key)!r} is not in store {cfg.store!r}; it has {reader.splits}"
               for key in ("train_split", "val_split", "test_split") if getattr(cfg, key) not in (None, *reader.splits)]
    if unknown:
        raise ConfigError(unknown)
    if cfg.val_split is not None:
        splits = Splits(cfg.train_split, None, cfg.val_split, None, cfg.test_split)
    else:
        is_val = validation_mask(reader.num_samples(cfg.train_split), cfg.val_fraction, cfg.seed)
        splits = Splits(cfg.train_split, ~is_val, cfg.train_split, is_val, cfg.test_split)
    # A split, or the part of it in use, whose samples were all skipped at extraction would
    # train nothing and then fail in evaluation: refuse it now, naming its key and the split.
    require_valid_samples(reader, [("train_split", splits.train, splits.train_keep),
                                   ("val_split" if cfg.val_split is not None else "val_fraction", splits.val, splits.val_keep),
                                   ("test_split", splits.test, None)])
    return splits


def validation_mask(n: int, fraction: float, seed: int) -> np.ndarray:
    """The seeded validation carve of a train split [n] (shared with the benchmark's references)."""
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(n)[: max(1, int(round(fraction * n)))]] = True
    return is_val


def count_samples(reader: CacheReader, split: str, keep: Optional[np.ndarray]) -> int:
    valid = reader.valid(split)
    return int((valid & keep).sum() if keep is not None else valid.sum())
