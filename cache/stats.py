"""Per-layer, per-channel feature statistics, kept in the store chunk by chunk.

Stage one writes, beside each chunk's features and before its completion stamp, the float64
sums of that chunk's valid samples (STATS_ROWS, one row of D values each), computed from the
values as stored (decoded exactly as the reader decodes them). Sums combine by addition, so
the statistics of a split are exact whatever order the chunks were computed in, and a resumed
or distributed extraction gives the same sums per chunk as one uninterrupted run.

    prefix_*: over the prefix tokens (CLS, registers) of every valid sample
    patch_*:  over the patch / feature-map tokens (for a pooled layer: its stored non-prefix tokens)
    pooled_*: over each valid sample's mean of its patch tokens (what a mean-pooling probe reads)

mean = sum / count and std = sqrt(sumsq / count - mean^2) (population std, as sklearn's
StandardScaler). A subset of the split (the train split minus a validation carve) subtracts
the sums of the samples it leaves out.
"""

from __future__ import annotations

import numpy as np
import torch

from cache.schema import LayerSpec

STATS_ROWS = ("prefix_sum", "prefix_sumsq", "patch_sum", "patch_sumsq", "pooled_sum", "pooled_sumsq")


def sums(values: torch.Tensor, valid: np.ndarray, spec: LayerSpec) -> np.ndarray:
    """Decoded values [n, T, D] of n samples (on any device) -> [len(STATS_ROWS), D] float64 sums over the valid ones."""
    x = values[torch.from_numpy(np.asarray(valid, dtype=bool)).to(values.device)].to(torch.float64)
    prefix, patch = x[:, : spec.prefix_tokens], x[:, spec.prefix_tokens :]
    pooled = patch.mean(dim=1) if patch.shape[1] else patch.sum(dim=1)  # [n, D]; no patch tokens: zeros, count 0
    rows = [prefix.sum((0, 1)), (prefix * prefix).sum((0, 1)), patch.sum((0, 1)), (patch * patch).sum((0, 1)),
            pooled.sum(0), (pooled * pooled).sum(0)]
    return torch.stack(rows).cpu().numpy()


def one_row_of_sums(values: torch.Tensor, valid: np.ndarray, spec: LayerSpec) -> tuple[int, np.ndarray]:
    """(row, its values) of one row of `sums`: the patch tokens' sum (the prefix's where there
    are none). Enough to tell one chunk's values from another's (verify), at a fraction of the
    cost of all of them."""
    x = values[torch.from_numpy(np.asarray(valid, dtype=bool)).to(values.device)]
    patch = spec.tokens > spec.prefix_tokens
    part = x[:, spec.prefix_tokens :] if patch else x[:, : spec.prefix_tokens]
    return STATS_ROWS.index("patch_sum" if patch else "prefix_sum"), part.sum((0, 1), dtype=torch.float64).cpu().numpy()


def summarize(total: np.ndarray, samples: int, spec: LayerSpec) -> dict[str, torch.Tensor]:
    """Summed rows over `samples` valid samples -> {"<kind>_mean", "<kind>_std"} [D] float64,
    for each kind of token the layer has, and "samples"."""
    counts = {"prefix": samples * spec.prefix_tokens, "patch": samples * (spec.tokens - spec.prefix_tokens),
              "pooled": samples if spec.tokens > spec.prefix_tokens else 0}
    out: dict[str, torch.Tensor] = {"samples": torch.tensor(samples)}
    for i, kind in enumerate(("prefix", "patch", "pooled")):
        if counts[kind] == 0:
            continue
        mean = torch.from_numpy(total[2 * i] / counts[kind])
        var = torch.from_numpy(total[2 * i + 1] / counts[kind]) - mean * mean
        out[f"{kind}_mean"], out[f"{kind}_std"] = mean, var.clamp_min(0).sqrt()
    return out
