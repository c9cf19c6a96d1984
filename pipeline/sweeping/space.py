"""The search space -> trials: a grid (every combination) or seeded random samples.

A trial is one adapter member: kind, architecture hyperparameters (layer included), learning
rate, weight decay and init seed. Its id hashes its canonical JSON together with the
training settings every trial shares and the store's fingerprint, so a rerun recognises a
finished trial, and a changed epoch count or store is never mistaken for one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config.sweep_config import Range, SpaceEntry, SweepConfig, integer_hparam

SIGNIFICANT_DIGITS = 4  # sampled floats are rounded: readable names, and ids survive a YAML round trip


@dataclass(frozen=True)
class Trial:
    id: str
    kind: str
    hparams: dict[str, Any]  # architecture hyperparameters, `layer` / `layers` included when chosen
    lr: float
    weight_decay: float
    seed: int

    def config(self) -> dict:
        return {"kind": self.kind, "hparams": self.hparams, "lr": self.lr, "weight_decay": self.weight_decay, "seed": self.seed}


def make_trials(cfg: SweepConfig, context: dict) -> list[Trial]:
    """Every trial of the sweep, in a deterministic order, without duplicates.

    context: what else decides a trial's result (store fingerprint, shared train settings);
    it enters each id.
    """
    points = _grid(cfg) if cfg.search == "grid" else _random(cfg)
    trials, seen = [], set()
    for kind, hparams, lr, wd, seed in points:
        trial = new_trial(kind, hparams, lr, wd, seed, context)
        if trial.id not in seen:  # random search over few choices draws repeats
            seen.add(trial.id)
            trials.append(trial)
    return trials


def new_trial(kind: str, hparams: dict, lr: float, weight_decay: float, seed: int, context: dict) -> Trial:
    hparams = {k: hparams[k] for k in sorted(hparams)}
    body = {"kind": kind, "hparams": hparams, "lr": float(lr), "weight_decay": float(weight_decay), "seed": int(seed)}
    canonical = json.dumps({"trial": body, "context": context}, sort_keys=True, separators=(",", ":"))
    return Trial(hashlib.sha256(canonical.encode()).hexdigest()[:12], kind, hparams, float(lr), float(weight_decay), int(seed))


def entry_axes(entry: SpaceEntry) -> dict[str, Any]:
    """Every axis a space entry samples, in a fixed order: layer(s), lr, weight_decay, hparams by name."""
    out: dict[str, Any] = {}
    if entry.layer is not None:
        out["layer"] = entry.layer
    if entry.layers is not None:
        out["layers"] = tuple(list(s) for s in entry.layers)
    return {**out, **entry.axes()}


def _grid(cfg: SweepConfig):
    for entry in cfg.space:
        axes = entry_axes(entry)
        for values in itertools.product(*axes.values()):
            point = dict(zip(axes, values))
            lr, wd = point.pop("lr"), point.pop("weight_decay")
            for seed in entry.seeds or (cfg.seed,):
                yield entry.kind, point, lr, wd, seed


def _random(cfg: SweepConfig):
    for i, entry in enumerate(cfg.space):
        # One generator per entry: adding an entry leaves the others' samples unchanged.
        rng = np.random.default_rng([cfg.seed, i])
        axes = entry_axes(entry)
        for _ in range(cfg.num_trials):
            point = {key: _sample(rng, axis, integer_hparam(entry.kind, key)) for key, axis in axes.items()}
            lr, wd = point.pop("lr"), point.pop("weight_decay")
            for seed in entry.seeds or (cfg.seed,):
                yield entry.kind, point, lr, wd, seed


def _sample(rng: np.random.Generator, axis, integer: bool):
    if not isinstance(axis, Range):
        return axis[int(rng.integers(len(axis)))]  # indexing keeps YAML's own types
    if integer:
        # Each integer as likely as Optuna's TPE (and its random start) makes it: rounding a
        # draw over [first, last] gave the two ends half the weight of the others.
        first, last = axis.integers()
        if not axis.log:
            return int(rng.integers(first, last + 1))
        value = math.exp(rng.uniform(math.log(first - 0.5), math.log(last + 0.5)))  # k covers [k - 0.5, k + 0.5)
        return int(min(max(round(value), first), last))
    low, high = (math.log(axis.low), math.log(axis.high)) if axis.log else (axis.low, axis.high)
    value = float(rng.uniform(low, high))
    return significant(math.exp(value) if axis.log else value)


def significant(value: float) -> float:
    """A sampled float rounded to SIGNIFICANT_DIGITS (random search and TPE alike)."""
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")
