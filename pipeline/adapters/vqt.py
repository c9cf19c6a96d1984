"""VQT (visual query tuning): learnable queries read every block of a frozen ViT from the cache.

Block l (0 .. L-1) has its own M = num_queries query tokens Z_l [M, D]. They pass through that
frozen timm block, attending to the block's input tokens X_l, which the cache holds
(X_0 = layer "embed", X_l = layer "blocks.<l-1>"). Keys and values come from X_l only, so the
original tokens are untouched and block l's output is exactly the cached "blocks.<l>". With
the block's own modules (H heads of width d_h, qkv split as W_q | W_k | W_v incl. bias):

    Q   = q_norm(norm1(Z_l) W_q + b_q)
    K   = k_norm(norm1(X_l) W_k + b_k),   V = norm1(X_l) W_v + b_v
    A   = attn.norm(concat_h softmax(Q_h K_h^T / sqrt(d_h)) V_h)      [B, M, D]
    Z'_l = Z_l + ls1(proj(A))
    O_l  = Z'_l + ls2(mlp(norm2(Z'_l)))                              query outputs [B, M, D]

    c      = norm(X_L[:, 0]) / ||norm(X_L[:, 0])||     final CLS after the backbone's final norm,
                                                     L2-normalised; X_L = layer "blocks.<L-1>"
    logits = concat(c, O_0, .., O_{L-1} flattened) W_c + b_c          W_c: [C, D + L*M*D]

Query outputs are not fed to the next block (that is what keeps the cached tokens valid).
K and V depend on no trainable parameter, so they are computed without autograd and could be
precomputed once per sample (benchmarks/bench_vqt_kv.py measures their share of a step).

The frozen blocks and final norm are borrowed, not owned: they are kept outside the module
tree, so they are neither trainable, nor in `state_dict()`, nor stacked by fused training;
`.to()` still moves them alongside the adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn

from cache.schema import KV_PREFIX, LayerSpec
from pipeline.adapters.attention import attend, merge_heads, split_heads
from pipeline.adapters.base import Adapter
from pipeline.adapters.errors import AdapterConfigError
from pipeline.adapters.hparams import require_at_least
from pipeline.adapters.registry import register_adapter

QUERY_INIT_STD = 0.02

KeysValues = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class VQTHparams:
    num_queries: int = 1
    # Read keys/values cached in stage one (layers "kv.<i>") when the store has them.
    use_cached_kv: bool = True

    def __post_init__(self):
        require_at_least(self, "num_queries", 1)


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
        self.kv_cached = self.hparams.use_cached_kv and all(kv_layer(i) in layers for i in range(depth))
        inputs = [kv_layer(i) if self.kv_cached else block_input_layer(i) for i in range(depth)]
        self.use_layers(layers, inputs + [self.final_layer])
        dim = self.frozen.blocks[0].attn.qkv.in_features
        _check_layers(self.layer_specs, self.final_layer, dim)

        num_queries = self.hparams.num_queries
        self.queries = nn.Parameter(torch.randn(depth, num_queries, dim) * QUERY_INIT_STD)
        self.head = nn.Linear(dim + depth * num_queries * dim, num_classes)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.classify(self.keys_values(features), features[self.final_layer])

    @torch.no_grad()
    def keys_values(self, features: Mapping[str, torch.Tensor]) -> KeysValues:
        """Per block, K and V [B, H, T, d_h] of its cached input tokens."""
        if self.kv_cached:
            return [_split_cached(block, features[kv_layer(i)]) for i, block in enumerate(self.frozen.blocks)]
        return [
            _keys_values(block, features[block_input_layer(i)])
            for i, block in enumerate(self.frozen.blocks)
        ]

    def query_outputs(self, keys_values: KeysValues) -> list[torch.Tensor]:
        """O_l [B, M, D] of every block, from that block's K/V."""
        return [
            _query_block(block, queries, k, v)
            for block, queries, (k, v) in zip(self.frozen.blocks, self.queries, keys_values)
        ]

    def classify(self, keys_values: KeysValues, final_tokens: torch.Tensor) -> torch.Tensor:
        """Logits from per-block K/V and the last block's output tokens (only CLS is read)."""
        cls = F.normalize(self.frozen.norm(final_tokens[:, 0]), dim=-1)
        outputs = [o.flatten(1) for o in self.query_outputs(keys_values)]
        return self.head(torch.cat([cls, *outputs], dim=-1))

    def _apply(self, fn: Callable, recurse: bool = True):
        # The borrowed modules live outside the module tree; keep them on the adapter's
        # device and dtype so that `adapter.to(device)` is all a caller needs.
        for module in self.frozen.modules():
            module._apply(fn)
        return super()._apply(fn, recurse)


def kv_layer(block_index: int) -> str:
    return f"{KV_PREFIX}{block_index}"


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
    """One frozen block applied to queries [M, D] attending to (k, v); returns [B, M, D]."""
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
        expected = 2 * dim if spec.is_kv else dim  # cached keys|values are twice as wide
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
    if specs[final_layer].prefix_tokens == 0:
        raise AdapterConfigError(
            f"VQT reads the final CLS token, but layer {final_layer!r} has no prefix tokens"
        )
