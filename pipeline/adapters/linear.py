"""Linear probe: a plain linear classifier on one pooled layer.

    z      = pool(X)          X = cached tokens [B, T, D] of `layer`; pool as in pooling.py
    logits = z W^T + b        W: [C, D] (or [C, 2D] for pool="cls_mean")

No normalisation layer sits before the head: a BatchNorm would make the output depend on the
batch (and carry running statistics that vmap-fused training cannot update in place). The
trainer standardises X per channel instead, with fixed train-split statistics (standardize.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from cache import LayerSpec
from pipeline.adapters.base import Adapter, last_layer_name
from pipeline.adapters.pooling import Pooling, check_pooling, pool_tokens, pooled_width
from pipeline.adapters.registry import register_adapter


@dataclass(frozen=True)
class LinearHparams:
    layer: str | None = None  # None: the last (deepest) layer of the store
    # "mean" is the default because it exists for every layer, CNN feature maps included.
    pool: Pooling = "mean"


@register_adapter("linear")
class LinearProbe(Adapter):
    Hparams = LinearHparams

    def __init__(
        self,
        layers: Mapping[str, LayerSpec],
        num_classes: int,
        hparams: LinearHparams | None = None,
    ):
        super().__init__(num_classes, hparams or LinearHparams())
        layer = self.hparams.layer or last_layer_name(layers)
        self.use_layers(layers, [layer])
        self.spec = self.layer_specs[layer]
        check_pooling(self.spec, self.hparams.pool)
        self.head = nn.Linear(pooled_width(self.spec, self.hparams.pool), num_classes)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        features = self.standardized(features)
        pooled = pool_tokens(features[self.spec.name], self.spec, self.hparams.pool)
        return self.head(pooled)
