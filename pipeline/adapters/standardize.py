"""Per-channel standardisation of cached features: a fixed affine, from stage one's statistics.

For a layer with P prefix tokens (CLS, registers) and patch / feature-map tokens after them,
with the train split's per-channel means and standard deviations of each kind of token
(cache/stats.py):

    x'[t, d] = (x[t, d] - mean_prefix[d]) / std_prefix[d]      t < P
    x'[t, d] = (x[t, d] - mean_patch[d])  / std_patch[d]       t >= P

A channel whose std is 0 (constant over the split) is only shifted. Nothing here is trained:
the shift and scale are plain tensors outside the module tree, so fused training shares them
between members (vmap sees unbatched constants and computes the affine once per batch) and
the members stay exactly what they would be alone. They are saved with the adapter, so a
prediction applies the same affine to new images.

Why: cached features are not normalised (DINOv2's last block has channels with means near
20); a probe then spends its steps on the scale of a few channels. The references
standardise too (MAE's probe: BatchNorm without affine; sklearn: StandardScaler).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from cache import LayerSpec

PREFIX = "standardize."


class Standardizer:
    def __init__(self, shift: Mapping[str, torch.Tensor], scale: Mapping[str, torch.Tensor]):
        """shift, scale: per layer, [T, D] tensors; x' = (x - shift) * scale."""
        self.shift, self.scale = dict(shift), dict(scale)

    @classmethod
    def from_stats(cls, stats: Mapping[str, Mapping[str, torch.Tensor]], specs: Mapping[str, LayerSpec]) -> "Standardizer":
        """stats: layer -> {"prefix_mean", "prefix_std", "patch_mean", "patch_std"} ([D] each;
        the prefix pair absent for layers without prefix tokens), as cache.stats computes."""
        shift, scale = {}, {}
        for name, s in stats.items():
            spec = specs[name]
            rows = [("prefix", spec.prefix_tokens), ("patch", spec.tokens - spec.prefix_tokens)]
            means = [s[f"{kind}_mean"].expand(n, -1) for kind, n in rows if n]
            stds = [s[f"{kind}_std"].expand(n, -1) for kind, n in rows if n]
            std = torch.cat(stds)
            # In the adapters' dtype (the default one, as their parameters are made).
            shift[name] = torch.cat(means).to(torch.get_default_dtype())
            scale[name] = torch.where(std > 0, 1.0 / std, torch.ones_like(std)).to(torch.get_default_dtype())
        return cls(shift, scale)

    def __call__(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: (x - self.shift[name]) * self.scale[name] if name in self.shift else x for name, x in features.items()}

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to save beside the adapter's weights (keys prefixed, never clashing with them)."""
        out = {}
        for name in self.shift:
            out[f"{PREFIX}{name}.shift"] = self.shift[name]
            out[f"{PREFIX}{name}.scale"] = self.scale[name]
        return out

    @classmethod
    def split_state(cls, state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], "Standardizer | None"]:
        """A saved file's tensors -> (the adapter's own state_dict, its Standardizer or None)."""
        own = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
        shift = {k[len(PREFIX):-len(".shift")]: v for k, v in state.items() if k.startswith(PREFIX) and k.endswith(".shift")}
        scale = {k[len(PREFIX):-len(".scale")]: v for k, v in state.items() if k.startswith(PREFIX) and k.endswith(".scale")}
        return own, (cls(shift, scale) if shift else None)

    def apply_fn(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Move / cast like the adapter's own tensors (called from Adapter._apply)."""
        self.shift = {k: fn(v) for k, v in self.shift.items()}
        self.scale = {k: fn(v) for k, v in self.scale.items()}
