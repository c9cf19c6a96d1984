"""Expand adapter entries into members, and group the members that can be trained fused."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

from cache.errors import ConfigError
from cache.schema import LayerSpec
from pipeline.adapters import adapter_class
from pipeline.config.train_config import AdapterEntry


@dataclass(frozen=True)
class Member:
    name: str
    kind: str
    hparams: dict[str, Any]  # the adapter's architecture hyperparameters (layer included)
    lr: float
    weight_decay: float
    seed: int
    standardize: bool = False  # read standardised features (see pipeline/adapters/standardize.py)
    solver: str = "adamw"  # "lbfgs": the probe solved exactly; weight_decay is then its L2 strength

    @property
    def shape_key(self) -> str:
        """Members with equal keys have identical architectures: they can share one fused pass."""
        return json.dumps([self.kind, self.hparams, self.standardize, self.solver], sort_keys=True, default=str)

    @property
    def layer_label(self) -> str:
        if "layer" in self.hparams:
            return str(self.hparams["layer"])
        layers = self.hparams.get("layers")
        return "+".join(layers) if layers else "all"


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
    names = [m.name for m in members]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"adapters: the same adapter is listed twice: {duplicates}")
    return members


def _architectures(entry: AdapterEntry, fields, layers: Mapping[str, LayerSpec]) -> list[dict]:
    if "layer" in fields:
        if entry.layers is None:
            return [dict(entry.hparams)]
        chosen = [n for n, spec in layers.items() if not spec.is_kv] if entry.layers == "all" else list(entry.layers)
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
