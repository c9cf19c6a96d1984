"""The contract every stage-two adapter fulfils.

An adapter is an nn.Module that maps cached features `{layer name: [B, T, D]}` to logits
[B, C]. Its registered parameters and buffers are exactly its trainable state: frozen backbone
modules an adapter borrows (VQT) are held outside the module tree, so `state_dict()`,
`parameters()` and `torch.func.stack_module_state` see only what training changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from cache import LayerSpec
from pipeline.adapters.errors import AdapterConfigError, did_you_mean
from pipeline.adapters.standardize import Standardizer


def layers_in_backbone_order(layers: Mapping[str, LayerSpec]) -> list[str]:
    """Layer names shallow to deep: by block_index when every layer has one (so that
    "blocks.10" follows "blocks.9" whatever the mapping order), else in the given order."""
    # Cached keys/values (VQT's) are not features: never a default input.
    names = [name for name, spec in layers.items() if spec.holds_features]
    if not names:
        raise AdapterConfigError("the store has no layers to build an adapter on")
    if all(layers[name].block_index is not None for name in names):
        names.sort(key=lambda name: layers[name].block_index)
    return names


def last_layer_name(layers: Mapping[str, LayerSpec]) -> str:
    return layers_in_backbone_order(layers)[-1]


class Adapter(nn.Module):
    kind: ClassVar[str]  # set by @register_adapter
    Hparams: ClassVar[type]  # frozen dataclass of architecture hyperparameters
    requires_backbone_modules: ClassVar[bool] = False
    # False for kinds whose inputs must stay as the backbone made them (VQT feeds them to
    # frozen blocks), so standardising them would change what the blocks compute.
    supports_standardize: ClassVar[bool] = True

    def __init__(self, num_classes: int, hparams: Any):
        super().__init__()
        if num_classes < 2:
            raise AdapterConfigError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.hparams = hparams
        self.layer_specs: dict[str, LayerSpec] = {}
        # A fixed affine on the cached features (standardize.py), outside the module tree:
        # not trained, not stacked by fused training, saved beside the weights.
        self.standardizer: Standardizer | None = None

    def standardize_with(self, standardizer: Standardizer | None) -> None:
        if standardizer is not None and not self.supports_standardize:
            raise AdapterConfigError(f"adapter {self.kind!r} runs frozen backbone modules on the cached tokens, which must "
                                     "stay as the backbone made them; set standardize: false for it")
        self.standardizer = standardizer

    def standardized(self, features: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The features as the adapter computes on them: every forward starts here. Only the
        layers it reads: a fused job's batches carry every layer its groups read."""
        return features if self.standardizer is None else self.standardizer({name: features[name] for name in self.layer_specs})

    def _apply(self, fn: Callable, recurse: bool = True):
        if self.standardizer is not None:
            self.standardizer.apply_fn(fn)
        return super()._apply(fn, recurse)

    def use_layers(self, available: Mapping[str, LayerSpec], names: Iterable[str]) -> None:
        """Record which cached layers this adapter reads, failing clearly on missing ones."""
        for name in names:
            if name not in available:
                raise AdapterConfigError(
                    f"adapter {self.kind!r} needs layer {name!r}{did_you_mean(name, available)}, "
                    f"which the store does not have; available layers: {', '.join(available)}"
                )
            self.layer_specs[name] = available[name]

    def noise_shape(self, batch: int) -> tuple[int, ...] | None:
        """The shape of the uniform [0, 1) draws a forward on `batch` samples takes as `noise=`
        (dropout masks), or None when it takes none (in eval, or a kind without randomness).
        Fused training draws them per member from the member's own generator (fused.py)."""
        return None

    def required_layers(self) -> list[str]:
        return list(self.layer_specs)

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

