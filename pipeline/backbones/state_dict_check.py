"""One check shared by the weight converters: does a mapped state dict fit the model exactly?"""

from __future__ import annotations

from typing import Mapping

import torch


def check_complete(
    target: Mapping[str, torch.Tensor],
    mapped: Mapping[str, torch.Tensor],
    unmapped_source: list[str],
    what: str,
) -> None:
    """Raise one error listing every unmatched key (both sides) and shape mismatch."""
    missing = sorted(set(target) - set(mapped))
    unexpected = sorted(set(mapped) - set(target))
    shapes = [
        f"{k}: source {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in mapped.items()
        if k in target and v.shape != target[k].shape
    ]
    if missing or unexpected or unmapped_source or shapes:
        raise ValueError(
            f"{what}: weights do not fit the model.\n"
            f"  source keys with no mapping rule: {unmapped_source}\n"
            f"  mapped keys the model lacks: {unexpected}\n"
            f"  model keys left unfilled: {missing}\n"
            f"  shape mismatches: {shapes}"
        )
