"""Expand adapter entries into members, and group the members that can be trained fused."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

from cache import ConfigError, LayerSpec
from pipeline.adapters import adapter_class
from pipeline.adapters.base import last_layer_name
from pipeline.config.train_config import AdapterEntry


@dataclass(frozen=True)
class Member:
    """One adapter to train. `name` is for people (reports, folders) and may repeat; `id` is
    for joining: the rows, ensembles and logits `train` writes carry it, and the sweep and the
    benchmark match results to what they asked for by it."""

    name: str
    kind: str
    hparams: dict[str, Any]  # the adapter's architecture hyperparameters (layer included)
    lr: float
    weight_decay: float
    seed: int
    standardize: bool = False  # read standardised features (see pipeline/adapters/standardize.py)
    solver: str = "adamw"  # "lbfgs": the probe solved exactly; weight_decay is then its L2 strength

    @property
    def id(self) -> str:
        """12 hex digits of the sha256 of the member's canonical JSON: equal for equal members, in
        every run and process (hparams' key order does not matter), distinct whenever any of
        kind, hparams, lr, weight_decay, seed, standardize or solver differs."""
        return _digest({**self._recipe(), "seed": int(self.seed)})

    @property
    def config_id(self) -> str:
        """The id without the seed: equal for the members of one configuration trained from
        different seeds (the benchmark averages a configuration over seeds by it)."""
        return _digest(self._recipe())

    def _recipe(self) -> dict:
        return {"kind": self.kind, "hparams": self.hparams, "lr": float(self.lr), "weight_decay": float(self.weight_decay),
                "standardize": bool(self.standardize), "solver": self.solver}

    @property
    def shape_key(self) -> str:
        """Members with equal keys have identical architectures: they can share one fused pass."""
        return json.dumps([self.kind, self.hparams, self.standardize, self.solver], sort_keys=True, default=str)

    @property
    def layer_label(self) -> str:
        return layer_label(self.hparams)


def layer_label(hparams: Mapping[str, Any]) -> str:
    """The layer(s) a member reads, for tables: its `layer`, its `layers` joined by "+", or
    "all" for a kind that chooses its own (e.g. LoSA without `layers`)."""
    if "layer" in hparams:
        return str(hparams["layer"])
    layers = hparams.get("layers")
    return "+".join(layers) if layers else "all"


def _digest(body: dict) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def check_layers(named: Iterable[tuple[str, Iterable[str]]], layers: Mapping[str, LayerSpec], store: Optional[str] = None) -> None:
    """One ConfigError naming every layer that is not in the store, for every entry at once.

    named: (config key, the layer names it gives), e.g. ("adapters[1].layers", ["blocks.9"]);
    train checks its adapter entries with it, sweep its space entries.
    """
    problems = []
    for key, names in named:
        unknown = list(dict.fromkeys(n for n in names if n not in layers))
        if unknown:
            problems.append(f"{key}: {unknown} are not in the store; it has {list(layers)}")
    if problems:
        raise ConfigError(problems, f"the layers of store {store!r}" if store else None)


def expand(entries: tuple[AdapterEntry, ...], layers: Mapping[str, LayerSpec], default_seed: int,
           store: Optional[str] = None) -> list[Member]:
    """Every member of every entry; store: its path, for the message when a layer is not in it."""
    check_layers(((f"adapters[{i}].layers", e.layers if isinstance(e.layers, tuple) else ()) for i, e in enumerate(entries)),
                 layers, store)
    members: list[Member] = []
    for entry in entries:
        cls = adapter_class(entry.kind)
        fields = cls.Hparams.__dataclass_fields__
        standardize = cls.supports_standardize if entry.standardize is None else entry.standardize
        lbfgs = entry.solver == "lbfgs"
        for arch in _architectures(entry, fields, layers):
            for lr in (0.0,) if lbfgs else _tuple(entry.lr):
                for wd in _tuple(entry.weight_decay):
                    for seed in entry.seeds or (default_seed,):
                        raw = cls.supports_standardize and not standardize
                        members.append(Member(_name(entry.kind, arch, lr, wd, seed, entry, raw), entry.kind, arch, lr, wd, seed,
                                              standardize, entry.solver))
    ids = [m.id for m in members]
    duplicates = sorted({m.name for m in members if ids.count(m.id) > 1})
    if duplicates:
        raise ConfigError(f"adapters: the same adapter is listed twice: {duplicates}")
    return members


def _architectures(entry: AdapterEntry, fields, layers: Mapping[str, LayerSpec]) -> list[dict]:
    if "layer" in fields:
        if entry.layers is None:  # the kind's default, named: it was labelled "all", and its id differed from the same layer's given
            return [{**entry.hparams, "layer": last_layer_name(layers)}]
        chosen = [n for n, spec in layers.items() if spec.holds_features] if entry.layers == "all" else list(entry.layers)
        return [{**entry.hparams, "layer": name} for name in chosen]
    if "layers" in fields and isinstance(entry.layers, tuple):
        return [{**entry.hparams, "layers": list(entry.layers)}]
    return [dict(entry.hparams)]


def _tuple(v) -> tuple:
    return v if isinstance(v, tuple) else (v,)


def _name(kind: str, arch: dict, lr: float, wd: float, seed: int, entry: AdapterEntry, raw: bool) -> str:
    parts = [kind]
    if "layer" in arch:
        parts.append(f"@{arch['layer']}")
    if arch.get("layers"):
        parts.append("@" + "+".join(arch["layers"]))
    extras = [f"{k}={v}" for k, v in sorted(arch.items()) if k not in ("layer", "layers")]
    if extras:
        parts.append("[" + ",".join(extras) + "]")
    parts.append(f" lbfgs l2={wd:g}" if entry.solver == "lbfgs" else f" lr={lr:g} wd={wd:g}")
    if raw:  # the kind's default is standardised features: say when these are not
        parts.append(" raw")
    if entry.seeds:
        parts.append(f" seed={seed}")
    return "".join(parts)


def group_by_shape(members: list[Member]) -> list[list[Member]]:
    groups: dict[str, list[Member]] = {}
    for m in members:
        groups.setdefault(m.shape_key, []).append(m)
    return list(groups.values())
