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
`train`'s results table reports the adapter's size relative to the backbone ("% of backbone",
from the store's `backbone_parameters`), the figure InCA is usually quoted with.

How it is computed: projecting every token to K and V costs O(B T D d) per adapter, and under
fused training (fused.py) every member would repeat that, each with its own LN_in affine.
Instead the per-token work uses only x = (X - mean_D X) / sqrt(var_D X + eps), LN_in without
its affine (gamma, beta), which depends on no parameter and so is computed once for all fused
members. With W_k,h, W_v,h, b_v,h the columns of head h and d_h = d/h:

    G_h    = (Q_h W_k,h^T) * gamma / sqrt(d_h)       [M, D] per head, independent of the batch
    p_h    = softmax_t(G_h x^T)                      [B, M, T]
    xbar_h = p_h x                                   [B, M, D]  the tokens pooled per query
    A_h    = (xbar_h * gamma + beta) W_v,h + b_v,h   [B, M, d_h]

This is the definition above exactly, not an approximation. The scores Q_h K_h^T / sqrt(d_h)
are G_h x^T + Q_h W_k,h^T beta / sqrt(d_h), and the second term is the same for every token,
so the softmax over tokens cancels it. The rows of p_h sum to 1, so p_h (x * gamma + beta) =
xbar_h * gamma + beta: pooling the normalised tokens and then applying the affine and W_v,h
equals pooling V_h. The cost per member is O(B T D M h) for scores and pooling plus O(B M D d)
for the values, instead of O(B T D d); gamma and beta go into the small weights and bias,
never onto the tokens.

When the layer has few, wide tokens (M h D > T d, e.g. a CNN's 3x3 final stage), the pooled
tokens [B, M h, D] would be larger than the values themselves, so the values are projected
first, V_h = x (gamma W_v,h^T) (+ the same constant bias), and then pooled with p_h: the same
sums in the other order (16 fused members on [256, 9, 320]: 104 -> 62 ms a step).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cache import LayerSpec
from pipeline.adapters.attention import merge_heads, pool_tokens, split_heads
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
        heads, queries = self.hparams.num_heads, self.hparams.num_queries
        tokens = self.standardized(features)[self.layer]
        # No affine: parameter-free, so shared by fused members (see the module docstring).
        normed = F.layer_norm(tokens, tokens.shape[-1:], eps=self.norm_in.eps)  # [B, T, D]
        gamma, beta = self.norm_in.weight, self.norm_in.bias
        q = split_heads(self.q_proj(self.queries), heads) * self.scale  # [H, M, d/H]
        w_k = self.k_proj.weight.unflatten(0, (heads, -1))  # [H, d/H, D]
        w_v = self.v_proj.weight.unflatten(0, (heads, -1))
        score_dirs = ((q @ w_k) * gamma).flatten(0, 1)  # [H*M, D]
        # One product with the token matrix: vmap stacks the members' rows of score_dirs.
        scores = (score_dirs @ normed.flatten(0, 1).mT).unflatten(1, normed.shape[:2])
        weights = scores.softmax(dim=-1)  # [H*M, B, T]
        tokens_count, width = normed.shape[1:]
        if queries * heads * width > tokens_count * self.v_proj.out_features:
            # Few, wide tokens (a CNN's last stages): the pooled tokens [B, H*M, D] would be
            # larger than the projected values [B, T, d], so project first, then pool.
            token_values = split_heads(F.linear(normed, self.v_proj.weight * gamma), heads)  # [B, H, T, d/H]
            values = weights.unflatten(0, (heads, queries)).permute(2, 0, 1, 3) @ token_values  # [B, H, M, d/H]
        else:
            pooled = pool_tokens(weights.transpose(0, 1), normed)  # [B, H*M, D]
            value_proj = (w_v * gamma).mT.repeat_interleave(queries, dim=0)  # [H*M, D, d/H]
            # Samples as rows: under vmap this multiplies pool_tokens' output where it lies,
            # while a per-sample product would first copy it into one block per (member, head).
            values = torch.bmm(pooled.transpose(0, 1), value_proj)  # [H*M, B, d/H]
            values = values.unflatten(0, (heads, queries)).permute(2, 0, 1, 3)  # [B, H, M, d/H]
        # concat_h (beta W_v,h + b_v,h) is v_proj(beta).
        attended = merge_heads(values) + self.v_proj(beta)  # [B, M, d]
        outputs = self.norm_out(self.out_proj(attended))
        if self.hparams.readout == "mean":
            return self.head(outputs.mean(dim=1))
        return self.head(outputs.flatten(1))
