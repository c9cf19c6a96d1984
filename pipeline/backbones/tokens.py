"""Token reductions applied before storing, for when full token maps do not fit on disk.

Input [B, T, D] with `prefix` prefix tokens then an (H, W) grid of patch tokens.
- all:      unchanged.
- cls:      prefix token 0                      -> [B, 1, D]
- mean:     mean of the patch tokens            -> [B, 1, D]
- cls_mean: cls then mean                       -> [B, 2, D]
- grid:     prefix tokens + patch tokens average-pooled to k x k -> [B, prefix + k*k, D]
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from cache import ConfigError, LayerSpec


@dataclass(frozen=True)
class TokenReduction:
    """One value of store.tokens: the stored shape of a layer, and how its tokens get there."""

    description: str  # one line, for listings
    stored: Callable[[LayerSpec, int], LayerSpec]  # (spec, k) -> the stored spec
    reduce: Callable[[torch.Tensor, LayerSpec, int], torch.Tensor]  # (x [B, T, D], spec, k) -> [B, T', D]
    needs_cls: bool = False  # reads prefix token 0
    needs_patches: bool = False  # reads the patch tokens
    pools_grid: bool = False  # pools the spatial grid to k x k: needs one, and k = store.grid_size


# replace(): what a reduction does not change (block index, final norm) stays recorded.
def _pooled(spec: LayerSpec, tokens: int, prefix: int) -> LayerSpec:
    return replace(spec, tokens=tokens, prefix_tokens=prefix, grid=None, registers_only=spec.registers_only and prefix > 0)


def _gridded(spec: LayerSpec, k: int) -> LayerSpec:
    return replace(spec, tokens=spec.prefix_tokens + k * k, grid=(k, k))


def _patch_mean(x: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    return x[:, spec.prefix_tokens:].mean(dim=1, keepdim=True)


def _grid_pool(x: torch.Tensor, spec: LayerSpec, k: int) -> torch.Tensor:
    p = spec.prefix_tokens
    b, _, d = x.shape
    h, w = spec.grid
    pooled = F.adaptive_avg_pool2d(x[:, p:].transpose(1, 2).reshape(b, d, h, w), k)
    return torch.cat([x[:, :p], pooled.flatten(2).transpose(1, 2)], dim=1)


# The values store.tokens takes, in the order configs and errors list them.
TOKEN_REDUCTIONS: dict[str, TokenReduction] = {
    "all": TokenReduction("every token, unchanged", lambda spec, k: spec, lambda x, spec, k: x),
    "cls": TokenReduction("prefix token 0 -> [1, D]", lambda spec, k: _pooled(spec, 1, 1), lambda x, spec, k: x[:, :1], needs_cls=True),
    "mean": TokenReduction("mean of the patch tokens -> [1, D]", lambda spec, k: _pooled(spec, 1, 0),
                           lambda x, spec, k: _patch_mean(x, spec), needs_patches=True),
    "cls_mean": TokenReduction("cls then mean -> [2, D]", lambda spec, k: _pooled(spec, 2, 1),
                               lambda x, spec, k: torch.cat([x[:, :1], _patch_mean(x, spec)], dim=1), needs_cls=True, needs_patches=True),
    "grid": TokenReduction("prefix tokens + patch tokens average-pooled to grid_size x grid_size", _gridded, _grid_pool,
                           needs_patches=True, pools_grid=True),
}


def reduced_spec(spec: LayerSpec, mode: str, k: int) -> LayerSpec:
    """The stored shape of `spec` after reduction; raises for reductions the layer cannot take."""
    p = spec.prefix_tokens
    if mode not in TOKEN_REDUCTIONS:
        raise ValueError(f"store.tokens: unknown reduction {mode!r}")
    r = TOKEN_REDUCTIONS[mode]
    if r.needs_cls and not spec.has_class_token:
        raise ConfigError(f"store.tokens: {mode!r} needs a CLS token, but layer {spec.name!r} has none (a CNN map, or a ViT whose "
                          "prefix tokens are registers only); use 'mean' or 'grid'")
    if r.needs_patches and spec.grid is None and spec.tokens == p:
        raise ConfigError(f"store.tokens: {mode!r} needs patch tokens, but layer {spec.name!r} has only prefix tokens")
    if r.pools_grid and spec.grid is None:
        raise ConfigError(f"store.tokens: 'grid' needs a spatial token grid, layer {spec.name!r} has none")
    return r.stored(spec, k)


def reduce_tokens(x: torch.Tensor, spec: LayerSpec, mode: str, k: Optional[int] = None) -> torch.Tensor:
    if mode not in TOKEN_REDUCTIONS:
        raise ValueError(f"unknown token reduction {mode!r}")
    return TOKEN_REDUCTIONS[mode].reduce(x, spec, k)
