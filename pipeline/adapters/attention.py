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
