"""Logits of every member on a split, and their accuracies (ensembles: training/ensembles.py)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from cache import CacheReader


@torch.no_grad()
def split_logits(groups: Sequence, reader: CacheReader, split: str, layers: list[str], batch_size: int,
                 keep: Optional[np.ndarray] = None, device: torch.device = torch.device("cpu")) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [members, n, C] (groups concatenated in order) and labels [n], in sample order,
    on the CPU; the groups compute on `device`, where their parameters are."""
    for g in groups:
        g.eval()
    outs, labels = [], []
    for batch in reader.batches(split, layers, batch_size, shuffle=False, keep=keep, out=torch.get_default_dtype()):
        features = {k: v.to(device, non_blocking=True) for k, v in batch.features.items()}
        outs.append(torch.cat([g(features) for g in groups], dim=0).cpu())
        labels.append(batch.labels)
    for g in groups:
        g.train()
    return torch.cat(outs, dim=1), torch.cat(labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[members, n, C], [n] -> accuracy per member [members]. A sample whose logits are not all
    finite (a diverged member) counts as wrong: argmax would read NaNs as class 0."""
    return ((logits.argmax(-1) == labels) & torch.isfinite(logits).all(-1)).double().mean(-1)  # k/n, not its float32 rounding
