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

from pipeline.config.train_config import AdapterEntry


@dataclass(frozen=True)
class SklearnSettings:
    """The independent reference: scikit-learn's LogisticRegression on mean-pooled features."""

    layer: Optional[str] = None  # null: the deepest cached layer
    C: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)  # inverse regularization grid, chosen on validation
    max_iter: int = 2000

    def problems(self) -> list[str]:
        return [f"C: got {list(self.C)}, expected positive values"] if not self.C or any(c <= 0 for c in self.C) else []


@dataclass(frozen=True)
class FinetuneSettings:
    """The paragon: every backbone weight trained, with a new linear head, from the images."""

    image_size: int  # smaller than the store's on a CPU (state it); full size on a GPU
    epochs: int
    lr: float = 3e-4
    weight_decay: float = 0.05
    batch_size: int = 32
    seeds: Optional[tuple[int, ...]] = None  # null: the bench's seeds

    def problems(self) -> list[str]:
        out = []
        for key in ("image_size", "epochs", "batch_size"):
            if getattr(self, key) <= 0:
                out.append(f"{key}: got {getattr(self, key)}, expected > 0")
        if self.lr <= 0:
            out.append(f"lr: got {self.lr}, expected > 0")
        if self.seeds == ():
            out.append("seeds: got [], expected at least one seed or null")
        return out


@dataclass(frozen=True)
class BenchCase:
    name: str
    extract: str  # an extract config file (configs/*.yaml)
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
    notes: str = ""  # printed under the case's heading: what was cut for time, caveats of the weights

    def problems(self) -> list[str]:
        out = []
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            out.append(f"name: got {self.name!r}, expected letters, digits, - and _ (it names folders)")
        if not self.methods and self.sklearn is None and self.finetune is None:
            out.append("methods: got [], expected at least one adapter entry, sklearn or finetune")
        kinds = [m.kind for m in self.methods]
        for kind in sorted({k for k in kinds if kinds.count(k) > 1}):
            out.append(f"methods: kind {kind!r} is listed twice; put its grid in one entry (lists of values)")
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
    output: str  # BENCHMARKS.md and the plots go here; per-unit results under units/ (resumable)
    cases: tuple[BenchCase, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 10
    batch_size: int = 128
    warmup_epochs: float = 1.0
    val_fraction: float = 0.1  # a seeded validation split carved from train (per seed)
    speed: Optional[SpeedSettings] = None
    report: Optional[str] = None  # also copy BENCHMARKS.md here (e.g. the repository root)

    def problems(self) -> list[str]:
        out = []
        if not self.cases:
            out.append("cases: got [], expected at least one case")
        names = [c.name for c in self.cases]
        for name in sorted({n for n in names if names.count(n) > 1}):
            out.append(f"cases: name {name!r} is used twice")
        if not self.seeds:
            out.append("seeds: got [], expected at least one seed")
        for key in ("epochs", "batch_size"):
            if getattr(self, key) <= 0:
                out.append(f"{key}: got {getattr(self, key)}, expected > 0")
        if not 0 < self.val_fraction < 1:
            out.append(f"val_fraction: got {self.val_fraction}, expected a value in (0, 1)")
        if self.speed is not None and self.speed.case not in names:
            out.append(f"speed.case: got {self.speed.case!r}, expected one of the cases {names}")
        return out

    def case(self, name: str) -> BenchCase:
        return next(c for c in self.cases if c.name == name)
