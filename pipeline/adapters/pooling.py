"""Reduction of a layer's tokens [B, T, D] to one vector per sample.

Token layout (cache.schema.LayerSpec): the first `prefix_tokens` tokens are prefix tokens
(CLS first, then registers), the rest are patch / feature-map tokens. A layer stored already
pooled (grid None) follows the same rule: its prefix tokens are the stored CLS, the remaining
tokens are stored means. So one definition covers both:

    cls(X)      = X[:, 0]                              needs a CLS token (LayerSpec.has_class_token)
    mean(X)     = mean_t X[:, prefix_tokens + t]       needs T > prefix_tokens
    cls_mean(X) = concat(cls(X), mean(X))              width 2D

For an already-pooled "mean" layer mean() returns the stored mean itself (mean of one token),
and for a "cls_mean" layer each half picks its stored token.
"""

from __future__ import annotations

from typing import Literal

import torch

from cache import LayerSpec
from pipeline.adapters.errors import AdapterConfigError

Pooling = Literal["cls", "mean", "cls_mean"]


def check_pooling(spec: LayerSpec, pool: Pooling) -> None:
    """Fail at construction, not mid-training, when `spec` cannot provide `pool`."""
    if pool in ("cls", "cls_mean") and not spec.has_class_token:
        raise AdapterConfigError(
            f"pool={pool!r} needs a CLS token, but layer {spec.name!r} has none (a CNN feature map, a mean-pooled "
            "layer, or a ViT whose prefix tokens are registers only); use pool='mean'"
        )
    if pool in ("mean", "cls_mean") and spec.tokens <= spec.prefix_tokens:
        raise AdapterConfigError(
            f"pool={pool!r} needs patch tokens or a stored mean, but layer {spec.name!r} stores "
            f"only its {spec.prefix_tokens} prefix token(s); use pool='cls'"
        )


def pooled_width(spec: LayerSpec, pool: Pooling) -> int:
    return 2 * spec.dim if pool == "cls_mean" else spec.dim


def pool_tokens(tokens: torch.Tensor, spec: LayerSpec, pool: Pooling) -> torch.Tensor:
    """[B, T, D] laid out as `spec` -> [B, D] (or [B, 2D] for cls_mean)."""
    if pool == "cls":
        return tokens[:, 0]
    mean = tokens[:, spec.prefix_tokens :].mean(dim=1)
    if pool == "mean":
        return mean
    return torch.cat([tokens[:, 0], mean], dim=-1)
