"""Token reductions applied before storing, for when full token maps do not fit on disk.

Input [B, T, D] with `prefix` prefix tokens then an (H, W) grid of patch tokens.
- all:      unchanged.
- cls:      prefix token 0                      -> [B, 1, D]
- mean:     mean of the patch tokens            -> [B, 1, D]
- cls_mean: cls then mean                       -> [B, 2, D]
- grid:     prefix tokens + patch tokens average-pooled to k x k -> [B, prefix + k*k, D]
"""

from __future__ import annotations

from dataclasses import replace

from typing import Optional

import torch
import torch.nn.functional as F

from cache.schema import LayerSpec


def reduced_spec(spec: LayerSpec, mode: str, k: int) -> LayerSpec:
    """The stored shape of `spec` after reduction; raises for reductions the layer cannot take."""
    p = spec.prefix_tokens
    if mode == "all":
        return spec
    if mode in ("cls", "cls_mean") and p == 0:
        raise ValueError(f"store.tokens: {mode!r} needs a CLS token, but layer {spec.name!r} has none (a CNN map?); use 'mean' or 'grid'")
    if mode in ("mean", "cls_mean", "grid") and spec.grid is None and spec.tokens == p:
        raise ValueError(f"store.tokens: {mode!r} needs patch tokens, but layer {spec.name!r} has only prefix tokens")
    if mode == "grid" and spec.grid is None:
        raise ValueError(f"store.tokens: 'grid' needs a spatial token grid, layer {spec.name!r} has none")
    # replace(): what the reduction does not change (block index, final norm) stays recorded.
    if mode == "cls":
        return replace(spec, tokens=1, prefix_tokens=1, grid=None)
    if mode == "mean":
        return replace(spec, tokens=1, prefix_tokens=0, grid=None)
    if mode == "cls_mean":
        return replace(spec, tokens=2, prefix_tokens=1, grid=None)
    if mode == "grid":
        return replace(spec, tokens=p + k * k, prefix_tokens=p, grid=(k, k))
    raise ValueError(f"store.tokens: unknown reduction {mode!r}")


def reduce_tokens(x: torch.Tensor, spec: LayerSpec, mode: str, k: Optional[int] = None) -> torch.Tensor:
    p = spec.prefix_tokens
    if mode == "all":
        return x
    if mode == "cls":
        return x[:, :1]
    patches = x[:, p:]
    if mode == "mean":
        return patches.mean(dim=1, keepdim=True)
    if mode == "cls_mean":
        return torch.cat([x[:, :1], patches.mean(dim=1, keepdim=True)], dim=1)
    if mode == "grid":
        b, _, d = x.shape
        h, w = spec.grid
        pooled = F.adaptive_avg_pool2d(patches.transpose(1, 2).reshape(b, d, h, w), k)
        return torch.cat([x[:, :p], pooled.flatten(2).transpose(1, 2)], dim=1)
    raise ValueError(f"unknown token reduction {mode!r}")
