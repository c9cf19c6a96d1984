"""Multi-head attention of a few query tokens over many cached tokens.

Written out as matmul + softmax rather than F.scaled_dot_product_attention because
torch.vmap (fused training, fused.py) has no batching rule for the fused SDPA kernels and would
fall back to a slow per-member loop. With a handful of queries the score matrix is tiny, so
the explicit form costs nothing.
"""

from __future__ import annotations

import torch


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[..., N, H*d] -> [..., H, N, d]"""
    *lead, n, width = x.shape
    return x.reshape(*lead, n, num_heads, width // num_heads).transpose(-3, -2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[..., H, N, d] -> [..., N, H*d]"""
    *lead, heads, n, d = x.shape
    return x.transpose(-3, -2).reshape(*lead, n, heads * d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v over the last two dims; q [.., M, d], k/v [.., T, d]."""
    scores = (q * scale) @ k.transpose(-2, -1)
    return scores.softmax(dim=-1) @ v


def pool_tokens(weights: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """weights [B, K, T] @ tokens [B, T, D] -> [B, K, D]: K weighted sums of each sample's tokens.

    The same product as `weights @ tokens`, but when vmapped over adapters that share the
    tokens (fused.py) the members are folded into K, one [B, N*K, T] @ [B, T, D] product;
    vmap's own rule for a per-sample product copies the shared tokens once per member.
    """
    return _PoolTokens.apply(weights, tokens)


class _PoolTokens(torch.autograd.Function):
    @staticmethod
    def forward(weights, tokens):
        return weights @ tokens

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        weights, tokens = ctx.saved_tensors
        grad_weights = grad @ tokens.mT if ctx.needs_input_grad[0] else None
        grad_tokens = weights.mT @ grad if ctx.needs_input_grad[1] else None
        return grad_weights, grad_tokens

    @staticmethod
    def vmap(info, in_dims, weights, tokens):
        weights_bdim, tokens_bdim = in_dims
        if tokens_bdim is None:
            pooled = _PoolTokens.apply(weights.movedim(weights_bdim, 1).flatten(1, 2), tokens)
            return pooled.unflatten(1, (info.batch_size, -1)), 1
        # Tokens differ per member: one product per (member, sample).
        members = info.batch_size
        weights = (
            weights.movedim(weights_bdim, 0)
            if weights_bdim is not None
            else weights.expand(members, *weights.shape)
        )
        tokens = tokens.movedim(tokens_bdim, 0)
        pooled = _PoolTokens.apply(weights.flatten(0, 1), tokens.flatten(0, 1))
        return pooled.unflatten(0, (members, -1)), 0
