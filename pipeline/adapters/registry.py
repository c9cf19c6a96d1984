"""Adapter kinds by name, as the CLI and the config layer see them.

    @register_adapter("linear")
    class LinearProbe(Adapter): ...

    build_adapter("linear", layers, num_classes=10, pool="mean")

`ADAPTERS` maps kind -> class; each class carries its `Hparams` dataclass, which
`parse_hparams` validates raw (YAML) mappings against.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from torch import nn

from cache import LayerSpec
from pipeline.adapters import hparams as hparams_module
from pipeline.adapters.base import Adapter
from pipeline.adapters.errors import AdapterConfigError, did_you_mean

ADAPTERS: dict[str, type[Adapter]] = {}


class BackboneModules(Protocol):
    """The frozen backbone parts an adapter may borrow; a timm VisionTransformer qualifies."""

    blocks: nn.Module  # nn.Sequential / nn.ModuleList of transformer blocks
    norm: nn.Module  # the final norm applied after the last block


def register_adapter(kind: str) -> Callable[[type[Adapter]], type[Adapter]]:
    def register(cls: type[Adapter]) -> type[Adapter]:
        if kind in ADAPTERS:
            raise ValueError(f"adapter kind {kind!r} is registered twice")
        params = getattr(cls.Hparams, "__dataclass_params__", None)
        if params is None or not params.frozen:
            # The config layer relies on Hparams being a frozen dataclass; fail at import.
            raise TypeError(f"{cls.__name__}.Hparams must be a frozen dataclass")
        cls.kind = kind
        ADAPTERS[kind] = cls
        return cls

    return register


def unknown_kind(kind: str) -> str:
    """What to say about a kind that is not registered (the config layer lists it as a problem)."""
    return f"unknown adapter kind {kind!r}{did_you_mean(kind, ADAPTERS)}; known kinds: {', '.join(sorted(ADAPTERS))}"


def adapter_class(kind: str) -> type[Adapter]:
    if kind not in ADAPTERS:
        raise AdapterConfigError(unknown_kind(kind))
    return ADAPTERS[kind]


def parse_hparams(kind: str, raw: Mapping[str, Any], elsewhere: tuple[str, ...] = ()) -> Any:
    """Validate `raw` against the `Hparams` dataclass of `kind` and return an instance
    (elsewhere: fields the caller's config sets by other keys, left out of the valid keys shown)."""
    return hparams_module.parse_hparams(kind, adapter_class(kind).Hparams, raw, elsewhere)


def build_adapter(
    kind: str,
    layers: Mapping[str, LayerSpec],
    num_classes: int,
    /,
    backbone_modules: BackboneModules | Mapping[str, nn.Module] | None = None,
    **hparams: Any,
) -> Adapter:
    """Construct adapter `kind` reading from `layers` (the store's layer specs).

    kind, layers and num_classes are positional-only so that hyperparameters may share their
    names (LoSA's `layers` hyperparameter selects a subset of the store's layers).

    backbone_modules: needed only by kinds with `requires_backbone_modules` (VQT), which run
    frozen backbone blocks on the cached tokens; pass the timm model, any object with
    `.blocks` and `.norm`, or a dict {"blocks": ..., "norm": ...}.
    """
    cls = adapter_class(kind)
    parsed = parse_hparams(kind, hparams)
    if not cls.requires_backbone_modules:
        return cls(layers, num_classes, hparams=parsed)
    if backbone_modules is None:
        raise AdapterConfigError(
            f"adapter {kind!r} runs frozen backbone blocks on the cached tokens, so it needs "
            "backbone_modules (the timm model, an object with .blocks and .norm, or a dict)"
        )
    if isinstance(backbone_modules, Mapping):
        parts = {name: backbone_modules.get(name) for name in ("blocks", "norm")}
    else:
        parts = {name: getattr(backbone_modules, name, None) for name in ("blocks", "norm")}
    missing = [name for name, module in parts.items() if module is None]
    if missing:
        raise AdapterConfigError(
            f"adapter {kind!r} runs a ViT's frozen blocks on the cached tokens, and this backbone "
            f"({type(backbone_modules).__name__}) has no {' and no '.join(f'`{m}`' for m in missing)}: "
            f"it needs a store of a ViT (timm's VisionTransformer family)"
        )
    return cls(
        layers, num_classes, blocks=parts["blocks"], final_norm=parts["norm"], hparams=parsed
    )
