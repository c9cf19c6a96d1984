"""LoSA: a low-rank side network that runs beside the (absent) backbone on cached layers.

Layers F_1 .. F_L (hyperparameter `layers`, default every store layer, shallow to deep). The
last layer fixes the side network's shape: P prefix tokens, an (H, W) grid, width D, and
T = P + H*W tokens. Each layer is first aligned to that shape:

    A_l(F_l) = R_l(F_l) W_l + b_l
        R_l: keeps the P prefix tokens; reshapes the patch tokens to [D_l, H_l, W_l] and
             adaptive-average-pools them to (H, W) (identity when the grids already match).
        W_l: per-layer Linear D_l -> D (identity when D_l = D). Pooling before projecting is
             exact (both are linear) and projects fewer tokens.

The side state then flows through one low-rank mixer block per layer (r = rank, LN =
LayerNorm over D, MLPs with GELU; token MLP acting along the token axis):

    S_0 = 0
    U_l = S_{l-1} + A_l(F_l)                                  that layer's features join in
    V_l = U_l + TokenMLP_l(LN(U_l)^T)^T                        TokenMLP_l:   T -> r -> T (no
                                                               output bias, see LowRankMixerBlock)
    S_l = V_l + ChannelMLP_l(LN(V_l))                          ChannelMLP_l: D -> r -> D

    logits = pool(LN_out(F_L + S_L)) W_c + b_c                pool as in pooling.py

LN_out is there because S_L accumulates all L aligned layers, so its scale grows with depth;
normalising keeps the head's input scale independent of how many layers feed the side network.
No gradient reaches a backbone: the side network reads cached features only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cache.schema import LayerSpec
from pipeline.adapters.base import Adapter, layers_in_backbone_order
from pipeline.adapters.errors import AdapterConfigError
from pipeline.adapters.hparams import HparamValueError, require_at_least
from pipeline.adapters.pooling import Pooling, check_pooling, pool_tokens, pooled_width
from pipeline.adapters.registry import register_adapter


@dataclass(frozen=True)
class LoSAHparams:
    layers: tuple[str, ...] | None = None  # None: every store layer, shallow to deep
    rank: int = 16
    pool: Pooling = "mean"

    def __post_init__(self):
        require_at_least(self, "rank", 1)
        if self.layers is not None and not self.layers:
            raise HparamValueError("layers", list(self.layers), "layer names, or null for all")


class LayerAligner(nn.Module):
    """A_l: resample one layer's tokens to the target grid, then project to the target width."""

    def __init__(self, source: LayerSpec, target: LayerSpec):
        super().__init__()
        self.source_grid, self.target_grid = source.grid, target.grid
        self.prefix_tokens = source.prefix_tokens
        self.project = nn.Linear(source.dim, target.dim) if source.dim != target.dim else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.source_grid != self.target_grid:
            prefix, patches = tokens[:, : self.prefix_tokens], tokens[:, self.prefix_tokens :]
            grid = patches.transpose(1, 2).unflatten(2, self.source_grid)  # [B, D, H_l, W_l]
            pooled = F.adaptive_avg_pool2d(grid, self.target_grid).flatten(2).transpose(1, 2)
            tokens = torch.cat([prefix, pooled], dim=1)
        return self.project(tokens) if self.project is not None else tokens


class LowRankMixerBlock(nn.Module):
    """U -> S: a low-rank token MLP then a low-rank channel MLP, each pre-norm residual."""

    def __init__(self, tokens: int, dim: int, rank: int):
        super().__init__()
        self.token_norm = nn.LayerNorm(dim)
        # No output bias on the token MLP: it would add one constant to all D channels of a
        # token, which every consumer of the side state (a LayerNorm over D) removes again.
        self.token_mlp = nn.Sequential(
            nn.Linear(tokens, rank), nn.GELU(), nn.Linear(rank, tokens, bias=False)
        )
        self.channel_norm = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(nn.Linear(dim, rank), nn.GELU(), nn.Linear(rank, dim))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        v = u + self.token_mlp(self.token_norm(u).transpose(1, 2)).transpose(1, 2)
        return v + self.channel_mlp(self.channel_norm(v))


@register_adapter("losa")
class LoSA(Adapter):
    Hparams = LoSAHparams

    def __init__(
        self,
        layers: Mapping[str, LayerSpec],
        num_classes: int,
        hparams: LoSAHparams | None = None,
    ):
        super().__init__(num_classes, hparams or LoSAHparams())
        hp = self.hparams
        self.use_layers(layers, hp.layers or layers_in_backbone_order(layers))
        specs = list(self.layer_specs.values())
        self.target = specs[-1]
        for spec in specs:
            _check_alignable(spec, self.target)
        check_pooling(self.target, hp.pool)

        self.aligners = nn.ModuleList(LayerAligner(spec, self.target) for spec in specs)
        self.side_blocks = nn.ModuleList(
            LowRankMixerBlock(self.target.tokens, self.target.dim, hp.rank) for _ in specs
        )
        self.norm_out = nn.LayerNorm(self.target.dim)
        self.head = nn.Linear(pooled_width(self.target, hp.pool), num_classes)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        side = None
        for name, align, block in zip(self.layer_specs, self.aligners, self.side_blocks):
            aligned = align(features[name])
            side = block(aligned if side is None else side + aligned)
        refined = self.norm_out(features[self.target.name] + side)
        return self.head(pool_tokens(refined, self.target, self.hparams.pool))


def _check_alignable(spec: LayerSpec, target: LayerSpec) -> None:
    if spec.grid is None:
        raise AdapterConfigError(
            f"LoSA needs the token grid of every layer, but layer {spec.name!r} is stored "
            "pooled; cache it with all tokens or leave it out of `layers`"
        )
    if spec.prefix_tokens != target.prefix_tokens:
        raise AdapterConfigError(
            f"LoSA cannot align layer {spec.name!r} ({spec.prefix_tokens} prefix tokens) with "
            f"the last layer {target.name!r} ({target.prefix_tokens} prefix tokens)"
        )
