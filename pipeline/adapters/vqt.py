"""VQT (visual query tuning): learnable queries read every block of a frozen ViT from the cache.

Block l (0 .. L-1) has its own M = num_queries query tokens Z_l [M, D]. They pass through that
frozen timm block, attending to the block's input tokens X_l, which the cache holds
(X_0 = layer "embed", X_l = layer "blocks.<l-1>"). Keys and values come from X_l only, so the
original tokens are untouched and block l's output is exactly the cached "blocks.<l>". With
the block's own modules (H heads of width d_h, qkv split as W_q | W_k | W_v incl. bias) and
p = dropout:

    Z~_l = Z_l * m_l / (1 - p)     in training, m_l ~ Bernoulli(1 - p) drawn per sample, query
                                   and channel ([B, M, D]); Z~_l = Z_l in eval
    Q   = q_norm(norm1(Z~_l) W_q + b_q)
    K   = k_norm(norm1(X_l) W_k + b_k),   V = norm1(X_l) W_v + b_v
    A   = attn.norm(concat_h softmax(Q_h K_h^T / sqrt(d_h)) V_h)      [B, M, D]
    Z'_l = Z~_l + ls1(proj(A))
    O_l  = Z'_l + ls2(mlp(norm2(Z'_l)))                              query outputs [B, M, D]

    c    = norm(X_L[:, 0])          final CLS after the backbone's final norm; X_L = "blocks.<L-1>"
    o_l  = vec(O_l)                 [B, M*D], block l's M query outputs side by side
    n(v) = v / max(||v||_2, 1e-12)  one L2 norm over the whole vector

    normalize = "per_block":  f = concat(n(c), n(o_0), .., n(o_{L-1}))   (the default)
    normalize = "cls":        f = concat(n(c), o_0, .., o_{L-1})
    normalize = "none":       f = concat(c, o_0, .., o_{L-1})
    logits = f W_c + b_c                                              W_c: [C, D + L*M*D]

"per_block" is the official code's NORMALIZE_FEATS (on by default there): the CLS and each
block's flattened outputs are scaled to unit length separately, so every block weighs the same
in the head whatever the scale of its activations; with M > 1 the M queries of a block share
one norm. Query dropout (rate 0.1 in all the official run scripts; 0 in its config defaults)
acts on the query tokens before each block, so the residual carries the dropped tokens too;
each sample draws its own mask. The masks come from uniform draws `noise` [L, B, M, D] (kept
where u >= p): fused training (fused.py) gives each member draws from its own generator,
seeded by its own seed, so a member's masks, like its result, do not depend on which members
train with it; called without `noise`, the adapter draws from torch's global generator.

Query outputs are not fed to the next block (that is what keeps the cached tokens valid).
K and V depend on no trainable parameter, so they are computed without autograd and could be
precomputed once per sample (benchmarks/bench_vqt_kv.py measures their share of a step).
The cached tokens go into frozen blocks, so they must stay as the backbone made them:
VQT refuses feature standardisation (supports_standardize = False).

The frozen blocks and final norm are borrowed, not owned: they are kept outside the module
tree, so they are neither trainable, nor in `state_dict()`, nor stacked by fused training;
`.to()` still moves them alongside the adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn

from cache import LayerSpec
from pipeline.adapters.attention import attend, merge_heads, split_heads
from pipeline.adapters.base import Adapter
from pipeline.adapters.errors import AdapterConfigError
from pipeline.adapters.hparams import HparamValueError, require_at_least
from pipeline.adapters.registry import register_adapter

QUERY_INIT_STD = 0.02

KeysValues = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class VQTHparams:
    num_queries: int = 1
    # Read keys/values cached in stage one (layers "kv.<i>") when the store has them.
    use_cached_kv: bool = True
    # What is L2-normalised before the head (module docstring): "per_block" = the official
    # NORMALIZE_FEATS, "cls" = the final CLS only (this adapter's behaviour before), "none".
    normalize: Literal["per_block", "cls", "none"] = "per_block"
    # Share of query values zeroed in training, before each block (official scripts: 0.1).
    dropout: float = 0.1

    def __post_init__(self):
        require_at_least(self, "num_queries", 1)
        if not 0.0 <= self.dropout < 1.0:  # also refuses NaN
            raise HparamValueError("dropout", self.dropout, "a probability p with 0 <= p < 1")


@dataclass
class FrozenViT:
    """Borrowed backbone parts; a plain object, so nn.Module does not register them."""

    blocks: tuple[Block, ...]
    norm: nn.Module

    def modules(self) -> tuple[nn.Module, ...]:
        return (*self.blocks, self.norm)


def block_input_layer(block_index: int) -> str:
    return "embed" if block_index == 0 else f"blocks.{block_index - 1}"


@register_adapter("vqt")
class VQT(Adapter):
    Hparams = VQTHparams
    requires_backbone_modules = True
    # The cached tokens feed frozen blocks: standardising them would change what they compute.
    supports_standardize = False

    def __init__(
        self,
        layers: Mapping[str, LayerSpec],
        num_classes: int,
        blocks: Iterable[nn.Module],
        final_norm: nn.Module,
        hparams: VQTHparams | None = None,
    ):
        super().__init__(num_classes, hparams or VQTHparams())
        self.frozen = FrozenViT(tuple(blocks), final_norm)
        _check_blocks(self.frozen.blocks)
        for module in self.frozen.modules():
            module.requires_grad_(False).eval()
        depth = len(self.frozen.blocks)
        self.final_layer = f"blocks.{depth - 1}"
        # With keys/values cached in stage one (backbone.cache_kv), read them instead of the
        # block inputs: their projection is then done once per sample, not once per epoch.
        cached = {spec.block_index: name for name, spec in layers.items() if spec.role == "keys_values"}
        self.kv_cached = self.hparams.use_cached_kv and all(i in cached for i in range(depth))
        self.inputs = [cached[i] if self.kv_cached else block_input_layer(i) for i in range(depth)]
        missing = [name for name in self.inputs + [self.final_layer] if name not in layers]
        if missing:  # "needs layer 'blocks.2' (did you mean 'blocks.5'?)" said nothing of what to extract
            raise AdapterConfigError(
                f"adapter 'vqt' feeds every block's cached input to that frozen block: it needs 'embed' (the input of "
                f"block 0) and blocks.0..blocks.{depth - 1}, all tokens; this store lacks {missing}. Extract with "
                f"backbone.layers: [0, ..., {depth - 1}], backbone.block_input: true and store.tokens: all")
        self.use_layers(layers, self.inputs + [self.final_layer])
        dim = self.frozen.blocks[0].attn.qkv.in_features
        _check_layers(self.layer_specs, self.final_layer, dim)

        num_queries = self.hparams.num_queries
        self.queries = nn.Parameter(torch.randn(depth, num_queries, dim) * QUERY_INIT_STD)
        self.head = nn.Linear(dim + depth * num_queries * dim, num_classes)

    def forward(self, features: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.classify(self.keys_values(features), features[self.final_layer], noise)

    def noise_shape(self, batch: int) -> tuple[int, ...] | None:
        """The uniform draws a training forward on `batch` samples takes: [L, B, M, D]."""
        if not self.training or self.hparams.dropout == 0:
            return None
        depth, num_queries, dim = self.queries.shape
        return depth, batch, num_queries, dim

    @torch.no_grad()
    def keys_values(self, features: Mapping[str, torch.Tensor]) -> KeysValues:
        """Per block, K and V [B, H, T, d_h] of its cached input tokens."""
        split = _split_cached if self.kv_cached else _keys_values
        return [split(block, features[name]) for block, name in zip(self.frozen.blocks, self.inputs)]

    def query_outputs(self, keys_values: KeysValues, noise: torch.Tensor | None = None) -> list[torch.Tensor]:
        """O_l [B, M, D] of every block, from that block's K/V (noise: see the module docstring)."""
        shape = self.noise_shape(keys_values[0][0].shape[0])
        if shape is None:
            return [_query_block(block, queries, k, v) for block, queries, (k, v) in zip(self.frozen.blocks, self.queries, keys_values)]
        if noise is None:
            noise = torch.rand(shape, dtype=self.queries.dtype, device=self.queries.device)
        p = self.hparams.dropout
        # Expanded to every sample, as the official code does: every sample has its own mask.
        return [_query_block(block, queries * (u >= p) / (1 - p), k, v)
                for block, queries, u, (k, v) in zip(self.frozen.blocks, self.queries, noise, keys_values)]

    def head_input(self, keys_values: KeysValues, final_tokens: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """f [B, D + L*M*D] from per-block K/V and the last block's tokens (only CLS is read)."""
        cls = self.frozen.norm(final_tokens[:, 0])
        outputs = [o.flatten(1) for o in self.query_outputs(keys_values, noise)]
        if self.hparams.normalize != "none":
            cls = F.normalize(cls, dim=-1)
        if self.hparams.normalize == "per_block":
            outputs = [F.normalize(o, dim=-1) for o in outputs]
        return torch.cat([cls, *outputs], dim=-1)

    def classify(self, keys_values: KeysValues, final_tokens: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from per-block K/V and the last block's output tokens."""
        return self.head(self.head_input(keys_values, final_tokens, noise))

    def _apply(self, fn: Callable, recurse: bool = True):
        # The borrowed modules live outside the module tree; keep them on the adapter's
        # device and dtype so that `adapter.to(device)` is all a caller needs.
        for module in self.frozen.modules():
            module._apply(fn)
        return super()._apply(fn, recurse)


def _split_cached(block: Block, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached [B, T, 2D] (the block's qkv output without queries) -> K, V as _keys_values."""
    attn = block.attn
    k, v = kv.split(attn.num_heads * attn.head_dim, dim=-1)
    return attn.k_norm(split_heads(k, attn.num_heads)), split_heads(v, attn.num_heads)


def _keys_values(block: Block, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    attn = block.attn
    width = attn.num_heads * attn.head_dim
    bias = attn.qkv.bias[width:] if attn.qkv.bias is not None else None
    kv = F.linear(block.norm1(tokens), attn.qkv.weight[width:], bias)
    k, v = kv.split(width, dim=-1)
    return attn.k_norm(split_heads(k, attn.num_heads)), split_heads(v, attn.num_heads)


def _query_block(
    block: Block, queries: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """One frozen block applied to queries [M, D] or [B, M, D] attending to (k, v) [B, H, T, d_h];
    returns [B, M, D]."""
    attn = block.attn
    width = attn.num_heads * attn.head_dim
    normed = block.norm1(queries)
    bias = attn.qkv.bias[:width] if attn.qkv.bias is not None else None
    q = attn.q_norm(split_heads(F.linear(normed, attn.qkv.weight[:width], bias), attn.num_heads))
    attended = attn.norm(merge_heads(attend(q, k, v, attn.scale)))
    if getattr(attn, "gate", None) is not None:
        attended = attended * attn.gate(normed).sigmoid()
    queries = queries + block.ls1(attn.proj(attended))
    return queries + block.ls2(block.mlp(block.norm2(queries)))


def _check_blocks(blocks: tuple[nn.Module, ...]) -> None:
    if not blocks:
        raise AdapterConfigError("VQT needs at least one backbone block")
    for i, block in enumerate(blocks):
        # _query_block re-implements exactly timm's pre-norm Block with standard Attention;
        # other block types (post-norm, parallel, RoPE) would silently compute something else.
        attn = getattr(block, "attn", None)
        if not isinstance(block, Block) or not isinstance(attn, Attention):
            raise AdapterConfigError(
                f"VQT supports timm vision_transformer.Block with timm.layers.Attention; "
                f"block {i} is {type(block).__name__} with attn {type(attn).__name__}"
            )


def _check_layers(specs: Mapping[str, LayerSpec], final_layer: str, dim: int) -> None:
    for name, spec in specs.items():
        if spec.through_final_norm:
            raise AdapterConfigError(
                f"VQT runs the frozen blocks on their cached inputs, but layer {name!r} was stored through the "
                "backbone's final norm (backbone.through_final_norm); extract a store without it for VQT"
            )
        expected = dim if spec.holds_features else 2 * dim  # cached keys|values are twice as wide
        if spec.dim != expected:
            raise AdapterConfigError(
                f"VQT: layer {name!r} has width {spec.dim}, the backbone blocks expect {expected}; "
                "are the store and the backbone the same model?"
            )
        if name != final_layer and spec.grid is None:
            raise AdapterConfigError(
                f"VQT attends to every token of its block inputs, but layer {name!r} is stored "
                "pooled; cache it with all tokens"
            )
    if not specs[final_layer].has_class_token:
        raise AdapterConfigError(
            f"VQT reads the final CLS token, but layer {final_layer!r} has none (no prefix tokens, or registers only)"
        )
