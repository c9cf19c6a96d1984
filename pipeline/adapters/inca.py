"""InCA: learnable queries cross-attending to one cached layer (introspective cross-attention).

With X the cached tokens [B, T, D] of `layer`, M = num_queries, d = dim (default D) and
h = num_heads:

    X' = LN_in(X)                                    LayerNorm over D
    Q  = P W_q + b_q,  K = X' W_k,  V = X' W_v + b_v    P: [M, D] learnable, N(0, 0.02^2) init
    A  = concat_h softmax(Q_h K_h^T / sqrt(d/h)) V_h  [B, M, d]
    O  = LN_out(A W_o + b_o)                         [B, M, d]
    z  = mean_m O_m            (readout="mean")      [B, d]
       | concat_m O_m          (readout="concat")    [B, M*d]
    logits = z W_c + b_c

K has no bias: a key bias adds q.b_k to every score of a query alike, which softmax ignores,
so it would only be a parameter with zero gradient (and Adam turns rounding noise on such a
parameter into full-size steps). The queries start small (std 0.02, the usual init of
transformer tokens) so that early training is driven by the projections rather than by large
random query directions.
`fraction_of_backbone` (from Adapter) reports the adapter's size relative to the backbone,
the figure InCA is usually quoted with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from cache.schema import LayerSpec
from pipeline.adapters.attention import attend, merge_heads, split_heads
from pipeline.adapters.base import Adapter, last_layer_name
from pipeline.adapters.hparams import HparamValueError, require_at_least
from pipeline.adapters.registry import register_adapter

QUERY_INIT_STD = 0.02


@dataclass(frozen=True)
class InCAHparams:
    layer: str | None = None  # None: the last (deepest) layer of the store
    num_queries: int = 1
    num_heads: int = 8
    dim: int | None = None  # attention width d; None: the layer's D
    readout: Literal["mean", "concat"] = "mean"

    def __post_init__(self):
        require_at_least(self, "num_queries", 1)
        require_at_least(self, "num_heads", 1)
        require_at_least(self, "dim", 1)


@register_adapter("inca")
class InCA(Adapter):
    Hparams = InCAHparams

    def __init__(
        self,
        layers: Mapping[str, LayerSpec],
        num_classes: int,
        hparams: InCAHparams | None = None,
    ):
        super().__init__(num_classes, hparams or InCAHparams())
        hp = self.hparams
        layer = hp.layer or last_layer_name(layers)
        self.use_layers(layers, [layer])
        self.layer = layer
        in_dim = self.layer_specs[layer].dim
        dim = hp.dim or in_dim
        if dim % hp.num_heads:
            raise HparamValueError(
                "num_heads", hp.num_heads, f"a divisor of the attention width {dim}"
            )
        self.scale = (dim // hp.num_heads) ** -0.5

        self.queries = nn.Parameter(torch.randn(hp.num_queries, in_dim) * QUERY_INIT_STD)
        self.norm_in = nn.LayerNorm(in_dim)
        self.q_proj = nn.Linear(in_dim, dim)
        self.k_proj = nn.Linear(in_dim, dim, bias=False)
        self.v_proj = nn.Linear(in_dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm_out = nn.LayerNorm(dim)
        head_width = dim * hp.num_queries if hp.readout == "concat" else dim
        self.head = nn.Linear(head_width, num_classes)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        heads = self.hparams.num_heads
        tokens = self.norm_in(features[self.layer])
        q = split_heads(self.q_proj(self.queries), heads)  # [H, M, d/H], shared by the batch
        k = split_heads(self.k_proj(tokens), heads)  # [B, H, T, d/H]
        v = split_heads(self.v_proj(tokens), heads)
        attended = merge_heads(attend(q, k, v, self.scale))  # [B, M, d]
        outputs = self.norm_out(self.out_proj(attended))
        if self.hparams.readout == "mean":
            return self.head(outputs.mean(dim=1))
        return self.head(outputs.flatten(1))
