"""Augmented training views: timm's train transform for the backbone, seeded per (sample, view).

A view is a pure function of (image, sample index, view): `SeededView` seeds the generators
timm's and torchvision's transforms draw from (Python's `random`, numpy's global one, torch's)
from `view_seed` just for the call and restores them after, so a rerun, a
resumed run and a distributed run all store the same pixels, and nothing else in the process
sees its draws. View 0 is never augmented: it is the clean extraction transform.

Policies (extract config `augment.policy`), all built by timm's `create_transform(is_training=
True)` at the backbone's input size, mean, std and interpolation, without colour jitter or
random erasing:
- crop_flip: random resized crop (`scale`, `ratio`) and horizontal flip (`hflip`);
- randaugment: the same, then timm's RandAugment (`augment.randaugment`, a timm config string);
- trivialaugment: the same, then torchvision's TrivialAugmentWide (timm has none).
"""

from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from timm.data import create_transform
from torchvision import transforms

if TYPE_CHECKING:
    from pipeline.config.extract_config import AugmentConfig

AugmentPolicy = Literal["crop_flip", "randaugment", "trivialaugment"]


def train_transform(data_config: dict, augment: AugmentConfig):
    """timm's train transform for a backbone's data config, as `augment` configures it."""
    dc = data_config
    kwargs = dict(is_training=True, scale=tuple(augment.scale), ratio=tuple(augment.ratio), hflip=augment.hflip, vflip=0.0,
                  color_jitter=None, re_prob=0.0, interpolation=dc["interpolation"], mean=dc["mean"], std=dc["std"])
    if augment.policy == "trivialaugment":
        crop_flip, _, final = create_transform(dc["input_size"], separate=True, **kwargs)
        return transforms.Compose([crop_flip, transforms.TrivialAugmentWide(), final])
    auto_augment = augment.randaugment if augment.policy == "randaugment" else None
    return create_transform(dc["input_size"], auto_augment=auto_augment, **kwargs)


def view_seed(seed: int, index: int, view: int) -> int:
    """The seed of view `view` of sample `index` (its position in the split): the first 8
    bytes, little-endian, of sha256("<seed>:<index>:<view>")."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}:{view}".encode()).digest()[:8], "little")


class SeededView:
    """Augmented view `view` (>= 1) of any sample: transform(image) with Python's `random`
    seeded by view_seed(seed, index, view), numpy's global generator by that seed mod 2**32,
    and torch's by that seed, for that call only."""

    def __init__(self, transform, seed: int, view: int):
        self.transform, self.seed, self.view = transform, seed, view

    def __call__(self, image, index: int) -> torch.Tensor:
        s = view_seed(self.seed, index, self.view)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(s)
                np.random.seed(s % 2**32)
                torch.manual_seed(s)
                return self.transform(image)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
