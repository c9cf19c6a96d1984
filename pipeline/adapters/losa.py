"""LoSA: a low-rank side network that refines the last cached layer with the layers before it.

After Mercea et al. 2024 (low-rank side adaptation): a light network runs beside the frozen
backbone, reads its layers and refines its output; no gradient reaches the backbone. Here the
backbone is absent and its layers come from the cache.

Layers F_1 .. F_L (hyperparameter `layers`, default every store layer, shallow to deep), each
as `standardized` returns it (base.py; the cached tokens when no standardizer is set). The last
layer F_L is the one refined: P prefix tokens, an (H, W) grid, width D, T = P + H*W tokens.
r = rank. N(X) = LayerNorm of each token over its D channels, without affine, eps 1e-6.

Each layer enters through its own rank-r map to the last layer's shape:

    A_l(F_l) = R_l(F_l) W_l^down W_l^up + b_l          W^down: D_l x r, W^up: r x D, b_l in R^D
        R_l: keeps the P prefix tokens; adaptive-average-pools the patch tokens from
             (H_l, W_l) to (H, W) (identity when the grids match). R_l acts on tokens and the
             W on channels, so pooling first is exact and projects fewer tokens; R_l reads no
             parameter, so fused training (fused.py) runs it once for all members.

The side state flows through one low-rank mixer block per layer (LN = LayerNorm over D with
affine, GELU in both MLPs, the token MLP acting along the token axis):

    S_0 = 0
    U_l = S_{l-1} + A_l(F_l)                            that layer's features join in
    V_l = U_l + TokenMLP_l(LN(U_l)^T)^T                 TokenMLP_l:   T -> r -> T, no output bias
    S_l = V_l + ChannelMLP_l(LN(V_l))                   ChannelMLP_l: D -> r -> D

and refines the last layer through a per-channel gate, which starts at zero:

    Y      = F_L + g * N(S_L)                           g in R^D, g = 0 at initialisation
    z      = pool(N(Y))    readout_norm (default for layers with prefix tokens: ViT blocks)
           | pool(Y)       otherwise (default for CNN feature maps)
    logits = z W_c^T + b_c                              pool as in pooling.py; default "cls" for
                                                        layers with a CLS token, else "mean"

Layers F_l are what `standardized` returns: with `standardize: false` the cached tokens, and
then the readout is the backbone's own (below). With the default `standardize: true` each
channel is first standardised over the training samples (prefix and patch tokens apart), so
N(Y) is a LayerNorm of standardised tokens: not an affine function of the backbone's readout,
and step 0 is a probe on pool(N(standardised F_L)) rather than on the backbone's readout.

With the cached tokens, the readout is the backbone's own. A cached ViT block output is taken before the backbone's
final norm, and the backbone reads out norm(x)[:, 0]; N is that norm without its affine, which
the head absorbs: W (gamma * x + beta) + b = (W diag(gamma)) x + (W beta + b), and pooling is
linear. A CNN's last stage is cached after its BatchNorm, and its head is a global average
pool, so its readout is the mean of the feature-map tokens and no norm.

Why g starts at zero: then Y = F_L exactly, and at step 0 LoSA is a linear probe on the last
layer's readout (of F_L as standardized gives it); the side network adds only what the loss asks of it. Summing the layers
directly into the readout (the previous design: LN(F_L + S_L), with identity aligners for
equal-width layers) let the early layers dominate what the head saw, and made LoSA worse than
a last-layer probe on DINOv2 (43% vs 57%). As with LoRA's zero B or ReZero, only g and the
head get a gradient at step 0 (everything upstream of g is multiplied by g = 0); after the
first step g != 0 (Adam moves each g_d by about lr) and the gradient reaches the whole side
network.

N(S_L) rather than S_L: S_L sums L projected layers and 2L residual MLP outputs, so its scale
grows with depth; normalised, g means the same for any number of layers. N also removes any
per-token constant over the channels, which passes through every block unchanged (each block
normalises its input and adds to it); a token MLP output bias would be such a constant, hence
none. No buffer changes and no parameter is changed in place, so torch.vmap (fused.py) applies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cache import LayerSpec
from pipeline.adapters.base import Adapter, layers_in_backbone_order
from pipeline.adapters.errors import AdapterConfigError
from pipeline.adapters.hparams import HparamValueError, require_at_least
from pipeline.adapters.pooling import Pooling, check_pooling, pool_tokens, pooled_width
from pipeline.adapters.registry import register_adapter

# timm's ViTs (DINOv2 included) build their norms with eps 1e-6.
NORM_EPS = 1e-6


@dataclass(frozen=True)
class LoSAHparams:
    layers: tuple[str, ...] | None = None  # None: every store layer, shallow to deep
    rank: int = 16
    # None: "cls" when the last layer has a CLS token (a ViT), else "mean" (a CNN map, registers only).
    pool: Pooling | None = None
    # None: True when the last layer has prefix tokens (a ViT block before its final norm).
    readout_norm: bool | None = None

    def __post_init__(self):
        require_at_least(self, "rank", 1)
        if self.layers is not None and not self.layers:
            raise HparamValueError("layers", list(self.layers), "layer names, or null for all")


class LayerAligner(nn.Module):
    """A_l: resample one layer's tokens to the target grid, then a rank-r map to the target width."""

    def __init__(self, source: LayerSpec, target: LayerSpec, rank: int):
        super().__init__()
        self.source_grid, self.target_grid = source.grid, target.grid
        self.prefix_tokens = source.prefix_tokens
        # No bias on the way down: it would pass through `up` as a second copy of up's bias.
        self.down = nn.Linear(source.dim, rank, bias=False)
        self.up = nn.Linear(rank, target.dim)

    def resample(self, tokens: torch.Tensor) -> torch.Tensor:
        """R_l: [B, P + H_l*W_l, D_l] -> [B, P + H*W, D_l]."""
        if self.source_grid == self.target_grid:
            return tokens
        prefix, patches = tokens[:, : self.prefix_tokens], tokens[:, self.prefix_tokens :]
        grid = patches.transpose(1, 2).unflatten(2, self.source_grid)  # [B, D_l, H_l, W_l]
        pooled = F.adaptive_avg_pool2d(grid, self.target_grid).flatten(2).transpose(1, 2)
        return torch.cat([prefix, pooled], dim=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(self.resample(tokens)))


class LowRankMixerBlock(nn.Module):
    """U -> S: a low-rank token MLP then a low-rank channel MLP, each pre-norm residual."""

    def __init__(self, tokens: int, dim: int, rank: int):
        super().__init__()
        self.token_norm = nn.LayerNorm(dim)
        # No output bias: it adds one constant to all D channels of a token, which N removes
        # from the side state's output (see the module docstring).
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
        ordered = layers_in_backbone_order(self.layer_specs)
        if list(self.layer_specs) != ordered:  # the side network runs shallow to deep and refines the last
            raise AdapterConfigError(f"LoSA reads its layers shallow to deep and refines the last one; got layers {list(self.layer_specs)}, "
                                     f"which in backbone order are {ordered}: list them in that order")
        specs = list(self.layer_specs.values())
        self.target = specs[-1]
        for spec in specs:
            _check_alignable(spec, self.target)
        is_vit = self.target.prefix_tokens > 0
        # A ViT without a class token (registers only) reads out the mean of its patches, as timm's *_gap models do.
        self.pool: Pooling = hp.pool or ("cls" if self.target.has_class_token else "mean")
        self.readout_norm = is_vit if hp.readout_norm is None else hp.readout_norm
        check_pooling(self.target, self.pool)

        self.aligners = nn.ModuleList(LayerAligner(spec, self.target, hp.rank) for spec in specs)
        self.side_blocks = nn.ModuleList(
            LowRankMixerBlock(self.target.tokens, self.target.dim, hp.rank) for _ in specs
        )
        self.gate = nn.Parameter(torch.zeros(self.target.dim))
        self.head = nn.Linear(pooled_width(self.target, self.pool), num_classes)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        features = self.standardized(features)
        side = None
        for name, align, block in zip(self.layer_specs, self.aligners, self.side_blocks):
            aligned = align(features[name])
            side = block(aligned if side is None else side + aligned)
        refined = features[self.target.name] + self.gate * _norm(side)
        if self.readout_norm:
            refined = _norm(refined)
        return self.head(pool_tokens(refined, self.target, self.pool))


def _norm(tokens: torch.Tensor) -> torch.Tensor:
    """N: LayerNorm over channels without affine."""
    return F.layer_norm(tokens, tokens.shape[-1:], eps=NORM_EPS)


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
