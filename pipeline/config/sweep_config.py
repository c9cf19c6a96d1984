"""The `sweep` job's config: a hyperparameter search over adapters trained from one store.

    python -m pipeline sweep configs/sweep_fashion_mnist_lite0.yaml [dotted.key=value ...]

YAML format (every key but `store`, `output` and `space` has a default):

    store: stores/fashion_mnist_lite0.zarr
    output: runs/sweep_fashion_mnist_lite0   # trials.jsonl, results.md, plots, best config
    # Training settings shared by every trial (as in a train config):
    train_split: train
    val_split: null          # null: carve val_fraction of train (seeded by `seed`)
    val_fraction: 0.1
    test_split: test         # reported only; never used to choose
    epochs: 4
    batch_size: 256
    warmup_epochs: 0.5
    seed: 0                  # data order, validation split, random search, default init seed
    save_top: 0              # adapters each job saves (0: none, a sweep only needs scores)
    search: random           # grid | random | tpe (Optuna's TPE, the `optuna` extra)
    num_trials: 8            # random: configurations sampled from EACH space entry; tpe: in all
    trials_per_job: 16       # trials trained together in one job (one cache pass per epoch)
    space:                   # one entry per adapter kind (or several per kind)
      - kind: linear
        layer: [blocks.6, bn2]                            # choices (kinds with one `layer`)
        lr: {low: 1.0e-4, high: 1.0e-2, log: true}        # a range (random and tpe only)
        weight_decay: [0.0, 1.0e-4]                        # choices
      - kind: inca
        layer: [blocks.6]
        lr: [1.0e-3, 3.0e-3]
        hparams: {num_heads: [2, 4], dim: 64}             # the kind's own hyperparameters
      - kind: losa
        layers: [[blocks.2, blocks.4, blocks.6]]         # choices of layer SETS (LoSA)
        hparams: {rank: {low: 4, high: 32, log: true}}    # integer hparams sample integers
        seeds: [0, 1]                                      # every configuration once per seed

Axes: `lr`, `weight_decay` and every value under `hparams` take a single value, a list of
choices, or (random and tpe search) a range `{low, high, log}`: uniform, or log-uniform with
`log: true`; floats are rounded to 4 significant digits; an integer hyperparameter draws
each integer in the range alike (with `log: true`, k covers [k - 0.5, k + 0.5) on the log
scale), as Optuna defines integer ranges. `layer` / `layers` take lists of choices. `seeds` is never sampled: each grid
point or random sample is trained once per listed seed (default: `[seed]`). A grid is the
product of every axis; random search draws `num_trials` samples per space entry from a
generator seeded with (seed, entry index), so a larger `num_trials` extends the same list.
`tpe` asks Optuna's TPE sampler (seeded by `seed`) for `num_trials` configurations in all,
a batch of `trials_per_job` per worker at a time, each told its validation accuracy
(pipeline.sweeping.tpe); ranges and choices as for random search, one seed per entry.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from pipeline.adapters import ADAPTERS, AdapterConfigError, adapter_class, parse_hparams
from pipeline.adapters.registry import unknown_kind
from pipeline.config.loader import to_dict
from pipeline.config.train_config import LAYER_KEYS, StoreJob, TrainingSettings, seed_problems


@dataclass(frozen=True)
class Range:
    """A continuous (or integer) axis for random search."""

    low: float
    high: float
    log: bool = False

    def integers(self) -> tuple[int, int]:
        """An integer hyperparameter's range: the first and last integers inside [low, high]
        (first > last when it holds none; validation refuses that)."""
        return math.ceil(self.low), math.floor(self.high)


Axis = Union[tuple, Range]  # a tuple of choices, or a range

RANGE_KEYS = ("low", "high", "log")


def parse_axis(key: str, value: Any) -> Axis:
    """YAML value of one axis -> tuple of choices or Range; ValueError names key and value."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(RANGE_KEYS))
        missing = [k for k in ("low", "high") if k not in value]
        if unknown or missing:
            raise ValueError(f"{key}: got {value!r}, expected a range {{low, high, log}}"
                             + (f"; unknown {unknown}" if unknown else "") + (f"; missing {missing}" if missing else ""))
        low, high, log = value["low"], value["high"], value.get("log", False)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)) \
                or not isinstance(log, bool):
            raise ValueError(f"{key}: got {value!r}, expected finite numbers for low and high and true/false for log")
        if not low < high:
            raise ValueError(f"{key}: got low={low}, high={high}, expected low < high")
        if log and low <= 0:
            raise ValueError(f"{key}: got low={low} with log: true, expected low > 0")
        return Range(float(low), float(high), log)
    choices = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not choices:
        raise ValueError(f"{key}: got [], expected at least one choice")
    if any(isinstance(v, float) and not math.isfinite(v) for v in choices):  # a NaN lr trained nothing and exited 0
        raise ValueError(f"{key}: got {value!r}, expected finite numbers")
    return choices


def integer_hparam(kind: str, key: str) -> bool:
    """Whether `kind` has an integer hyperparameter `key` (a range over it samples integers)."""
    annotation = typing.get_type_hints(adapter_class(kind).Hparams).get(key)
    return annotation is int or int in typing.get_args(annotation)


@dataclass(frozen=True)
class SpaceEntry:
    kind: str
    # Kinds with a `layer` hyperparameter (linear, inca): layer names to choose from;
    # null = the kind's default (the deepest layer).
    layer: Optional[tuple[str, ...]] = None
    # Kinds with a `layers` hyperparameter (losa): layer sets to choose from; null = all.
    layers: Optional[tuple[tuple[str, ...], ...]] = None
    # A value, a list of choices or a range {low, high, log} (see the module docstring).
    lr: Any = 1e-3
    weight_decay: Any = 1e-4
    hparams: dict[str, Any] = field(default_factory=dict)
    seeds: Optional[tuple[int, ...]] = None  # null: the sweep's seed

    def axes(self) -> dict[str, Axis]:
        """Every sampled axis except layer(s) and seeds, in a fixed order: lr, weight_decay, then hparams by name."""
        out = {"lr": parse_axis("lr", self.lr), "weight_decay": parse_axis("weight_decay", self.weight_decay)}
        for key in sorted(self.hparams):
            out[key] = parse_axis(f"hparams.{key}", self.hparams[key])
        return out

    def problems(self) -> list[str]:
        if self.kind not in ADAPTERS:
            return [f"kind: {unknown_kind(self.kind)}"]
        fields = {f.name for f in dataclasses.fields(adapter_class(self.kind).Hparams)}
        out = []
        for key in ("layer", "layers"):
            if key in self.hparams:
                out.append(f"hparams.{key}: set the entry's `{key}` instead")
            elif getattr(self, key) is not None and key not in fields:
                has = [k for k in ("layer", "layers") if k in fields]
                instead = f"; use `{has[0]}`" if has else "; it chooses its own layers"
                out.append(f"{key}: adapter {self.kind!r} has no `{key}` hyperparameter{instead}")
            elif getattr(self, key) == ():
                out.append(f"{key}: got [], expected at least one choice or null")
        out += seed_problems("seeds", self.seeds)
        for key in ("lr", "weight_decay"):
            try:
                axis = parse_axis(key, getattr(self, key))
            except ValueError as e:
                out.append(str(e))
                continue
            values = (axis.low, axis.high) if isinstance(axis, Range) else axis
            bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (key == "lr" and v == 0)]
            if bad:
                out.append(f"{key}: got {bad}, expected {'positive' if key == 'lr' else 'non-negative'} numbers")
        for key in sorted(self.hparams):
            if key in ("layer", "layers"):
                continue
            out.extend(self._hparam_problems(key))
        return out

    def _hparam_problems(self, key: str) -> list[str]:
        try:
            axis = parse_axis(f"hparams.{key}", self.hparams[key])
        except ValueError as e:
            return [str(e)]
        # A range is checked at both ends: this catches unknown keys and non-numeric hparams.
        values = (axis.low, axis.high) if isinstance(axis, Range) else axis
        if isinstance(axis, Range) and integer_hparam(self.kind, key):
            values = axis.integers()
            if values[0] > values[1]:
                return [f"hparams.{key}: got low={axis.low:g}, high={axis.high:g}, which holds no integer; {key} is an integer"]
        out = []
        for v in values:
            try:
                parse_hparams(self.kind, {key: v}, elsewhere=LAYER_KEYS)
            except AdapterConfigError as e:
                out.append(f"hparams.{key}: {e}")
                break
        return out


@dataclass(frozen=True, kw_only=True)
class SweepConfig(StoreJob):
    space: tuple[SpaceEntry, ...]
    search: Literal["grid", "random", "tpe"] = "grid"
    num_trials: Optional[int] = None  # random search: samples per space entry; tpe: trials in all
    trials_per_job: int = 16
    save_top: int = 0  # adapters saved per job (the exported best config retrains them)

    def train_settings(self) -> dict:
        """The train-config keys every trial shares (they enter each trial's id)."""
        # Not what decides a result: how many adapters are saved, whether the store is held in
        # memory, the device (a sweep resumed on a GPU keeps the trials its CPU run finished).
        # `pruning` only when set: sweeps from before it existed keep their trial ids.
        return {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(TrainingSettings)
                if f.name not in ("save_top", "memory_budget_mb", "device") and not (f.name == "pruning" and self.pruning is None)}

    def problems(self) -> list[str]:
        out = self.job_problems()
        if not self.space:
            out.append("space: got [], expected at least one adapter entry")
        if self.search in ("random", "tpe") and (self.num_trials is None or self.num_trials <= 0):
            out.append(f"num_trials: got {self.num_trials}, expected an integer > 0 for search: {self.search}")
        if self.search == "tpe":
            out += [f"space[{i}].seeds: got {list(e.seeds)}, but search: tpe tells one value per configuration; give one seed"
                    for i, e in enumerate(self.space) if e.seeds and len(e.seeds) > 1]
        if self.search == "grid" and self.num_trials is not None:
            out.append(f"num_trials: got {self.num_trials}, but a grid runs every point; remove it or use search: random")
        if self.search == "grid":
            for i, entry in enumerate(self.space):
                for key, value in {"lr": entry.lr, "weight_decay": entry.weight_decay,
                                   **{f"hparams.{k}": v for k, v in entry.hparams.items()}}.items():
                    if isinstance(value, dict):
                        out.append(f"space[{i}].{key}: got range {value!r}, but search: grid needs a list of values")
        if self.trials_per_job <= 0:
            out.append(f"trials_per_job: got {self.trials_per_job}, expected > 0")
        return out
