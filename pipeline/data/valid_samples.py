"""A split whose samples were all skipped at extraction (unreadable images) can neither train
nor score anything: refuse it before any work, naming the split and the config key that chose it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np

from cache import ConfigError

if TYPE_CHECKING:
    from cache import CacheReader


def require_valid_samples(reader: "CacheReader", uses: list[tuple[str, Optional[str], Optional[np.ndarray]]]) -> None:
    """Raise one ConfigError naming every part of a split that training reads and that holds no valid sample.

    uses: (config key, split name or None when unused, boolean mask of the part of the split
    that is read, or None for all of it), e.g. [("train_split", "train", ~is_val),
    ("val_fraction", "train", is_val), ("test_split", "test", None)].
    """
    problems, empty = [], []
    for key, split, keep in uses:
        if split is None:
            continue
        valid = np.asarray(reader.valid(split), dtype=bool)
        part = valid if keep is None else valid[np.asarray(keep, dtype=bool)]
        if part.any():
            continue
        if part.size == 0:  # a carve that leaves one side nothing: no unreadable image to blame
            empty.append(f"{key}: selects none of the {valid.size} sample(s) of split {split!r}; choose a val_fraction that "
                         "leaves samples on both sides")
            continue
        skipped = f"{int((~valid).sum())} of its {valid.size} sample(s) were skipped as unreadable at extraction"
        if keep is None:
            problems.append(f"{key}: split {split!r} has no valid sample ({skipped})")
        else:
            problems.append(f"{key}: the {part.size} sample(s) it selects from split {split!r} are all invalid ({skipped})")
    if problems:
        problems = ["; ".join(problems) + "; its manifest lists them under 'skipped': fix or remove those files and extract again"]
    if problems or empty:
        raise ConfigError(f"store {str(reader.path)!r}: " + "; ".join(empty + problems))
