"""The `bench` job's config: the real benchmark of accuracy, cost and speed.

    python -m pipeline bench configs/bench_real.yaml [dotted.key=value ...]

Each case is one backbone on one dataset: an extract config (plus overrides) names the store,
`methods` are adapter entries whose lists (lr, weight_decay, hparams per layer) form the
hyperparameter grid, trained once per seed; the configuration with the best validation
accuracy averaged over the seeds is chosen, and its test accuracy is reported as mean and
spread over the seeds. Test is never used to choose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pipeline.config.loader import PathText
from pipeline.config.train_config import AdapterEntry, seed_problems


def method_id(entry: AdapterEntry) -> str:
    """Names a case's method (its units, folders, per-layer table): the kind, plus what
    tells apart two entries of one kind (the solver; InCA's attention width; raw features)."""
    parts = [entry.kind]
    if entry.solver != "adamw":
        parts.append(entry.solver)
    if entry.kind == "inca":
        parts.append(f"d{entry.hparams['dim']}" if entry.hparams.get("dim") else "full")
    if entry.standardize is False:
        parts.append("raw")
    return "_".join(parts)


@dataclass(frozen=True)
class SklearnSettings:
    """The independent reference: scikit-learn's LogisticRegression on mean-pooled features."""

    layer: Optional[str] = None  # null: the deepest cached layer
    C: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)  # inverse regularization grid, chosen on validation
    max_iter: int = 2000
    # Also fit every cached layer, so the per-layer tables compare our probes with it row by row.
    per_layer: bool = False

    def problems(self) -> list[str]:
        return [f"C: got {list(self.C)}, expected positive values"] if not self.C or any(c <= 0 for c in self.C) else []


@dataclass(frozen=True)
class FinetuneSettings:
    """The paragon: every backbone weight trained, with a new linear head, from the images.

    Training images get random resized crop + horizontal flip; validation and test the
    extraction's resize + centre crop. Each lr is trained on the first seed, the best
    validation accuracy chooses one, and the other seeds run at it.
    """

    image_size: int  # the store's size, for a like-for-like comparison with the cached methods
    epochs: int  # the most epochs a run trains; the warm-up + cosine schedule spans them all
    time_budget_s: Optional[float] = None  # stop after the first epoch whose cumulative training seconds reach it; null: none
    lr: float | tuple[float, ...] = 3e-4  # a list: chosen on validation (first seed)
    weight_decay: float = 0.05
    batch_size: int = 32
    warmup_epochs: float = 0.5
    crop_scale: tuple[float, ...] = (0.08, 1.0)  # random resized crop's area range (timm's ImageNet default)
    seeds: Optional[tuple[int, ...]] = None  # null: the bench's seeds

    @property
    def lrs(self) -> tuple[float, ...]:
        return self.lr if isinstance(self.lr, tuple) else (self.lr,)

    def problems(self) -> list[str]:
        out = []
        for key in ("image_size", "epochs", "batch_size"):
            if getattr(self, key) <= 0:
                out.append(f"{key}: got {getattr(self, key)}, expected > 0")
        if not self.lrs or any(v <= 0 for v in self.lrs) or len(set(self.lrs)) < len(self.lrs):
            out.append(f"lr: got {list(self.lrs)}, expected distinct positive values")
        if self.time_budget_s is not None and self.time_budget_s < 0:
            out.append(f"time_budget_s: got {self.time_budget_s}, expected >= 0 seconds or null")
        if self.warmup_epochs < 0:
            out.append(f"warmup_epochs: got {self.warmup_epochs}, expected >= 0")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            out.append(f"crop_scale: got {list(self.crop_scale)}, expected [low, high] with 0 < low <= high <= 1")
        out += seed_problems("seeds", self.seeds)
        return out


@dataclass(frozen=True)
class ViewsStudy:
    """Accuracy and cost against the number of views per training image (extract store.views):
    each count is its own store of the same images, each method's grid trains on it per seed."""

    methods: tuple[AdapterEntry, ...]
    counts: tuple[int, ...] = (1, 4, 8)
    augment: tuple[str, ...] = ()  # extract overrides of the augmentation, e.g. [augment.scale=[0.35,1.0]]

    def problems(self) -> list[str]:
        out = []
        if not self.counts or any(k < 1 for k in self.counts) or list(self.counts) != sorted(set(self.counts)):
            out.append(f"counts: got {list(self.counts)}, expected increasing view counts >= 1 (1 first to compare with)")
        if not self.methods:
            out.append("methods: got [], expected at least one adapter entry")
        if any(not o.startswith("augment.") or "=" not in o for o in self.augment):
            out.append(f"augment: got {list(self.augment)}, expected augment.KEY=VALUE overrides")
        return out


@dataclass(frozen=True)
class BenchCase:
    name: str
    extract: PathText  # an extract config file (configs/*.yaml)
    test_split: str
    methods: tuple[AdapterEntry, ...]
    overrides: tuple[str, ...] = ()  # dotted overrides of the extract config, e.g. store.tokens=all
    train_split: str = "train"
    ensemble_top_k: int = 3
    sklearn: Optional[SklearnSettings] = None
    finetune: Optional[FinetuneSettings] = None
    # Other stores of the same images to price: each a list of extract overrides
    # (e.g. [store.dtype=int8]); the chosen linear and InCA configs are retrained on each.
    store_variants: tuple[tuple[str, ...], ...] = ()
    views: Optional[ViewsStudy] = None  # accuracy and cost against augmented views per training image
    notes: str = ""  # printed under the case's heading: what was cut for time, caveats of the weights

    def problems(self) -> list[str]:
        out = []
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            out.append(f"name: got {self.name!r}, expected letters, digits, - and _ (it names folders)")
        if not self.methods and self.sklearn is None and self.finetune is None:
            out.append("methods: got [], expected at least one adapter entry, sklearn or finetune")
        ids = [method_id(m) for m in self.methods]
        for method in sorted({k for k in ids if ids.count(k) > 1}):
            out.append(f"methods: {method!r} is listed twice; put its grid in one entry (lists of values)")
        if self.ensemble_top_k <= 0:
            out.append(f"ensemble_top_k: got {self.ensemble_top_k}, expected > 0")
        for i, option in enumerate(self.store_variants):
            if not option or any("=" not in o for o in option):
                out.append(f"store_variants[{i}]: got {list(option)}, expected a list of dotted.key=value overrides")
        return out


@dataclass(frozen=True)
class SpeedSettings:
    """The side-by-side speed ratios, measured on one case's store."""

    case: str
    images: int = 1000  # images per extraction round and per online epoch
    rounds: int = 3  # paired rounds of extract vs bare forward (the median ratio is reported)
    fused: int = 16  # N in "N fused adapters vs one"
    layer: Optional[str] = None  # the InCA layer timed; null: the deepest layer
    sweep_configs: int = 16  # K in "extract once + K trainings vs K online trainings"

    def problems(self) -> list[str]:
        return [f"{k}: got {getattr(self, k)}, expected > 0" for k in ("images", "rounds", "fused", "sweep_configs") if getattr(self, k) <= 0]


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    output: PathText  # BENCHMARKS.md and the plots go here; per-unit results under units/ (resumable)
    cases: tuple[BenchCase, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 10
    min_steps: int = 0  # at least this many optimiser steps per adapter run (small splits get more epochs)
    batch_size: int = 128
    warmup_epochs: float = 1.0
    val_fraction: float = 0.1  # a seeded validation split carved from train (per seed)
    speed: Optional[SpeedSettings] = None
    report: Optional[PathText] = None  # also copy BENCHMARKS.md here (e.g. the repository root)
    # Rewrite the headline block of this file (between the bench's markers; e.g. README.md).
    readme: Optional[PathText] = None

    def problems(self) -> list[str]:
        out = []
        if not self.cases:
            out.append("cases: got [], expected at least one case")
        names = [c.name for c in self.cases]
        for name in sorted({n for n in names if names.count(n) > 1}):
            out.append(f"cases: name {name!r} is used twice")
        out += seed_problems("seeds", self.seeds)
        for key in ("epochs", "batch_size"):
            if getattr(self, key) <= 0:
                out.append(f"{key}: got {getattr(self, key)}, expected > 0")
        for key in ("min_steps", "warmup_epochs"):  # found only after extraction before
            if getattr(self, key) < 0:
                out.append(f"{key}: got {getattr(self, key)}, expected >= 0")
        if not 0 < self.val_fraction < 1:
            out.append(f"val_fraction: got {self.val_fraction}, expected a value in (0, 1)")
        if self.speed is not None and self.speed.case not in names:
            out.append(f"speed.case: got {self.speed.case!r}, expected one of the cases {names}")
        return out

    def case(self, name: str) -> BenchCase:
        return next(c for c in self.cases if c.name == name)
