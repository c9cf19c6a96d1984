"""The `train` job's config: which adapters to train from which store, and how.

Each entry of `adapters` expands into members: one per layer (for kinds that read one layer),
per learning rate, per weight decay and per seed. Members that differ only in lr, weight
decay or seed share a shape and are trained fused (one vmapped forward/backward).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from cache import option_problems
from pipeline.adapters import ADAPTERS, AdapterConfigError, adapter_class, parse_hparams
from pipeline.adapters.registry import unknown_kind
from pipeline.config.loader import PathText


@dataclass(frozen=True)
class AdapterEntry:
    kind: str
    # Kinds with a `layer` hyperparameter (linear, inca): "all" = one member per cached layer,
    # a list = one per listed layer, null = the kind's default (the deepest layer).
    # LoSA: the layers its side network reads ("all" or null = every layer).
    layers: Union[str, tuple[str, ...], None] = None
    hparams: dict[str, Any] = field(default_factory=dict)
    lr: Union[float, tuple[float, ...]] = 1e-3
    weight_decay: Union[float, tuple[float, ...]] = 1e-4
    seeds: Optional[tuple[int, ...]] = None  # null: the run's seed
    # Standardise the cached features per channel with the train split's statistics (a fixed
    # affine, see pipeline/adapters/standardize.py). null: on for every kind that supports it
    # (all but VQT, whose inputs feed frozen blocks): the benchmark shows it helps.
    standardize: Optional[bool] = None
    # linear only: "lbfgs" solves the probe exactly (full-batch multinomial logistic regression
    # on standardised pooled features, pipeline/training/convex_probe.py) instead of AdamW
    # steps; then lr is unused and each weight_decay value is an L2 strength l2 of
    # mean CE + l2/2 ||W||^2 (sklearn's C = 1 / (l2 n)), one member per value.
    solver: Literal["adamw", "lbfgs"] = "adamw"

    def problems(self) -> list[str]:
        if self.kind not in ADAPTERS:
            return [f"kind: {unknown_kind(self.kind)}"]
        out = []
        fields = adapter_class(self.kind).Hparams.__dataclass_fields__
        for key in LAYER_KEYS:
            if key in self.hparams:
                out.append(f"hparams.{key}: set the entry's `layers` instead")
        if self.layers is not None and "layer" not in fields and "layers" not in fields:
            out.append(f"layers: adapter {self.kind!r} chooses its own layers; remove `layers`")
        if (isinstance(self.layers, str) and self.layers != "all") or self.layers == ():  # [] trained no member, silently
            out.append(f"layers: got {list(self.layers) if isinstance(self.layers, tuple) else self.layers!r}, "
                       "expected 'all', a list of layer names or null")
        out += seed_problems("seeds", self.seeds)
        try:
            parse_hparams(self.kind, {k: v for k, v in self.hparams.items() if k not in LAYER_KEYS}, elsewhere=LAYER_KEYS)
        except AdapterConfigError as e:
            out.append(f"hparams: {e}")
        if self.solver == "lbfgs" and self.kind != "linear":
            out.append(f"solver: 'lbfgs' solves the linear probe only; adapter {self.kind!r} trains with 'adamw'")
        if self.solver == "lbfgs" and self.standardize is False:
            out.append("standardize: the lbfgs solver always standardises the pooled features (folded into the weights)")
        if self.standardize and not adapter_class(self.kind).supports_standardize:
            out.append(f"standardize: adapter {self.kind!r} feeds the cached tokens to frozen backbone modules, which "
                       "expect them as the backbone made them; set standardize: false or leave it out")
        for key in ("lr", "weight_decay"):
            values = getattr(self, key)
            values = values if isinstance(values, tuple) else (values,)
            if not values or any(v < 0 for v in values) or (key == "lr" and any(v == 0 for v in values)):
                out.append(f"{key}: got {list(values)}, expected positive values")
        return out


@dataclass(frozen=True)
class Pruning:
    """Successive halving of the members that train together, by ASHA's promotion rule.

    Rungs are the epochs min_epochs * reduction_factor**k below the last epoch. At a rung, a
    member goes on only if its best validation accuracy so far is among the top
    1/reduction_factor (at least the top one) of every value reached at that rung: by the
    members training with it, and (in a sweep) by the trials of earlier jobs. A stopped
    member trains no more, keeps its best state, and its row says the epoch it stopped at.
    """

    min_epochs: int = 1
    reduction_factor: int = 3

    def rungs(self, epochs: int) -> list[int]:
        out, r = [], self.min_epochs
        while r < epochs:
            out.append(r)
            r *= self.reduction_factor
        return out

    def problems(self) -> list[str]:
        out = []
        if self.min_epochs < 1:
            out.append(f"min_epochs: got {self.min_epochs}, expected >= 1")
        if self.reduction_factor < 2:
            out.append(f"reduction_factor: got {self.reduction_factor}, expected an integer >= 2")
        return out


def promoted(value: float, competing: list[float], reduction_factor: int) -> bool:
    """ASHA's rule: `value` is among the top 1/reduction_factor of `competing` (which holds
    it), and the best value always is."""
    ranked = sorted(competing, reverse=True)
    return value >= ranked[max(len(ranked) // reduction_factor - 1, 0)]


SEED_LIMIT = 2**63  # numpy's SeedSequence takes no negative seed, torch.manual_seed none past 2**64


LAYER_KEYS = ("layer", "layers")  # hyperparameters an entry sets with its own keys, not in hparams


def seed_problems(key: str, seeds) -> list[str]:
    """A seed, or a list of them (None: not given), each in [0, 2**63); an empty list is refused."""
    if seeds is None:
        return []
    values = seeds if isinstance(seeds, tuple) else (seeds,)
    if not values:
        return [f"{key}: got [], expected at least one seed or null"]
    if any(not 0 <= s < SEED_LIMIT for s in values):  # a raw ValueError or OverflowError, some only after extraction
        return [f"{key}: got {list(values) if isinstance(seeds, tuple) else seeds}, expected integers in [0, 2**63)"]
    return []


@dataclass(frozen=True, kw_only=True)
class TrainingSettings:
    """How every adapter is trained; shared by `train` configs and by each trial of a sweep."""

    train_split: str = "train"
    # null: carve val_fraction of the train split (seeded, uniform).
    val_split: Optional[str] = None
    val_fraction: float = 0.1
    test_split: Optional[str] = None
    epochs: int = 10
    # At least this many optimiser steps: on a small split, epochs are raised until there are
    # (e.g. 900 samples at batch 128 are 8 steps an epoch: 10 epochs would be 80 steps).
    min_steps: int = 0
    batch_size: int = 256
    warmup_epochs: float = 1.0
    seed: int = 0
    save_top: int = 3  # how many of the best members (by validation) to save
    # A train split stored with augmented views (extract store.views > 1): "random" draws one
    # view per sample each epoch (the exact probe solves on every view at once); "clean" reads
    # view 0 only. Validation and test are always clean. A split without views reads it either way.
    views: Literal["clean", "random"] = "random"
    # Hold the layers a run reads in memory (decoded once, as stored) when they fit this budget
    # (MB; null: half of what is free at setup plus what is held, in RAM or on the GPU; 0: always stream
    # from the store). Shared by every fused group, and by the sweep jobs a worker runs on the
    # same store.
    memory_budget_mb: Optional[float] = None
    # Where the adapters train and the held layers live: auto = the GPU when CUDA is present.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Stop losing members at rungs (successive halving; null: every member trains every epoch).
    pruning: Optional[Pruning] = None

    def training_problems(self) -> list[str]:
        out = seed_problems("seed", self.seed)
        if self.val_split is None and not 0 < self.val_fraction < 1:
            out.append(f"val_fraction: got {self.val_fraction}, expected a value in (0, 1)")
        # A split that chooses (validation) or scores (test) must not be one that trains or
        # chooses: the reported test accuracy would be inflated without a word.
        if self.val_split is not None and self.val_split == self.train_split:
            out.append(f"val_split: got {self.val_split!r}, the train_split; leave it null to carve validation from it")
        if self.test_split is not None and self.test_split in (self.train_split, self.val_split):
            which = "train_split" if self.test_split == self.train_split else "val_split"
            out.append(f"test_split: got {self.test_split!r}, the {which}; the test split must be one nothing was trained or chosen on")
        for key in ("epochs", "batch_size"):
            if getattr(self, key) <= 0:
                out.append(f"{key}: got {getattr(self, key)}, expected > 0")
        if self.min_steps < 0:
            out.append(f"min_steps: got {self.min_steps}, expected >= 0")
        if self.warmup_epochs < 0:
            out.append(f"warmup_epochs: got {self.warmup_epochs}, expected >= 0")
        if self.save_top < 0:
            out.append(f"save_top: got {self.save_top}, expected >= 0")
        if self.memory_budget_mb is not None and self.memory_budget_mb < 0:
            out.append(f"memory_budget_mb: got {self.memory_budget_mb}, expected >= 0 (0: always stream) or null")
        return out


@dataclass(frozen=True, kw_only=True)
class StoreJob(TrainingSettings):
    """A job that trains from one store into one output folder (train, and each sweep)."""

    store: PathText  # a local path or an fsspec URL (s3://bucket/prefix)
    storage_options: dict[str, Any] = field(default_factory=dict)  # for a URL: passed to fsspec; cache.location.SAFE_OPTIONS only
    output: PathText

    def job_problems(self) -> list[str]:
        out = self.training_problems() + option_problems(self.store, self.storage_options, path_key="store")
        if not self.output.strip():  # "" is the current directory, which --overwrite replaced
            out.append(f"output: got {self.output!r}, expected a folder path")
        return out


@dataclass(frozen=True, kw_only=True)
class TrainConfig(StoreJob):
    adapters: tuple[AdapterEntry, ...]
    # Stop when no member's validation accuracy improved for this many epochs; null = never.
    early_stopping_patience: Optional[int] = None
    ensemble_top_k: int = 3
    log_every: int = 20  # steps between metrics lines
    # Set by `sweep` for each job: the validation accuracies trials of earlier jobs reached at
    # each rung epoch (keys: the epoch), which `pruning` ranks this run's members against.
    rung_history: dict[str, tuple[float, ...]] = field(default_factory=dict)
    # Set by `sweep` for each job: the store the driver ranks its trials under (its fingerprint
    # and creation, cache's CacheReader.creation); a job refuses another store at the same path
    # (re-extracted meanwhile, or another host's copy).
    store_creation: Optional[str] = None

    def problems(self) -> list[str]:
        out = self.job_problems()
        if not self.adapters:
            out.append("adapters: got [], expected at least one adapter entry")
        for key in ("ensemble_top_k", "log_every"):
            if getattr(self, key) <= 0:
                out.append(f"{key}: got {getattr(self, key)}, expected > 0")
        if self.early_stopping_patience is not None and self.early_stopping_patience <= 0:
            out.append(f"early_stopping_patience: got {self.early_stopping_patience}, expected > 0 or null")
        return out
