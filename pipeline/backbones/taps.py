"""Capture the tokens of chosen layers in one forward pass, as [B, T, D] per layer.

Layers are given as indices (timm's `forward_intermediates` numbering: ViT blocks, CNN
stages from `feature_info`; negative allowed) or module names. A block or stage comes from
`forward_intermediates` however it was named; other modules are captured with forward hooks
(refused for 4-D outputs of channels-last models, whose layout nothing states).
CNN maps [B, C, H, W] become tokens [B, H*W, C] (row-major). ViT tokens keep timm's order:
prefix tokens (CLS, registers) first, then patch tokens. For ViTs the block-0 input (the
embedded tokens) can be captured too, as layer "embed".

Hooks copy what a module returns at the moment it returns it: later in-place operations
(ResNet's ReLU(inplace=True) after a BatchNorm, the residual `x += shortcut` after a block's
last norm) would otherwise rewrite the captured tensor before the forward pass ends.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
from typing import Union

import torch

from cache import ConfigError, LayerSpec

EMBED = "embed"
KEYS_VALUES = "kv."  # + block index: the name of a layer whose role is keys_values
_BLOCK = re.compile(r"blocks\.(\d+)")
# torch layers whose 4-D output is [B, C, H, W] by definition, in any model.
_NCHW_MODULES = (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.MaxPool2d, torch.nn.AvgPool2d, torch.nn.AdaptiveAvgPool2d,
                 torch.nn.AdaptiveMaxPool2d, torch.nn.InstanceNorm2d)
_NO_QKV = ("backbone.cache_kv: this ViT's attention has no fused qkv projection that it calls as a module (BEiT and EVA "
           "add their own biases or project q, k, v apart), so its keys/values cannot be captured; set cache_kv: false")


def is_vit(model: torch.nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("blocks", "num_prefix_tokens", "patch_embed"))


class LayerTaps:
    def __init__(self, model: torch.nn.Module, layers: tuple[Union[int, str], ...], block_input: bool, image_size: tuple[int, int],
                 cache_kv: bool = False, through_final_norm: bool = False):
        self.model = model
        self.vit = is_vit(model)
        if through_final_norm and not (self.vit and isinstance(getattr(model, "norm", None), torch.nn.Module)):
            raise ConfigError("backbone.through_final_norm: only a ViT's block outputs can be stored through its final norm; "
                              "this model has no blocks and final norm")
        if through_final_norm and isinstance(model.norm, torch.nn.Identity):
            # An average-pool ViT norms after pooling (fc_norm): its `norm` is an Identity, and the
            # store would record normed blocks that are not.
            raise ConfigError("backbone.through_final_norm: this ViT has no final norm over its tokens (model.norm is an "
                              "Identity; it norms after pooling, fc_norm); store its blocks without it")
        self.through_final_norm = through_final_norm
        self.prefix = int(getattr(model, "num_prefix_tokens", 0)) if self.vit else 0
        self.has_intermediates = hasattr(model, "forward_intermediates")
        self.index_names: dict[int, str] = {}  # normalised index -> layer name
        self.hook_names: list[str] = []
        self._resolve(layers)
        self.capture_embed = self.vit and block_input
        self._captured: dict[str, torch.Tensor] = {}
        self._handles = [
            model.get_submodule(name).register_forward_hook(self._save_output(name)) for name in self.hook_names
        ]
        if self.capture_embed:
            self._handles.append(model.blocks[0].register_forward_pre_hook(self._save_input(EMBED)))
        self.kv_names: list[str] = []
        if cache_kv:
            if not self.vit:
                raise ConfigError("backbone.cache_kv: keys/values are cached for ViT blocks only; this model is not a ViT")
            for i, block in enumerate(model.blocks):
                self.kv_names.append(f"{KEYS_VALUES}{i}")
                qkv = getattr(getattr(block, "attn", None), "qkv", None)
                if not isinstance(qkv, torch.nn.Module):  # EVA02 base/large: separate q, k, v projections
                    raise ConfigError(_NO_QKV)
                self._handles.append(qkv.register_forward_hook(self._save_keys_values(self.kv_names[-1])))
        self.specs = self._probe_specs(image_size)

    # -- resolution ---------------------------------------------------------------------
    def _index_count_and_names(self) -> list[str]:
        if self.vit:
            return [f"blocks.{i}" for i in range(len(self.model.blocks))]
        info = getattr(self.model, "feature_info", None)
        if info is None:
            return []
        return [f["module"] for f in info] if isinstance(info, list) else list(info.module_name())

    def _resolve(self, layers) -> None:
        indexed = self._index_count_and_names()
        modules = dict(self.model.named_modules())
        problems, names = [], []
        for layer in layers:
            if isinstance(layer, int):
                if not indexed:
                    problems.append(f"layer {layer}: this model has no indexed blocks/stages; name modules instead")
                    continue
                if not -len(indexed) <= layer < len(indexed):
                    problems.append(f"layer {layer}: out of range; valid indices are -{len(indexed)}..{len(indexed) - 1} ({', '.join(indexed)})")
                    continue
                name = indexed[layer % len(indexed)]
            else:
                # A stage's name may be feature_info's label rather than a module (HRNet's "stem"):
                # it is found by index, as extraction found it when the config gave the index.
                if (layer not in modules or layer == "") and not (layer in indexed and self.has_intermediates):
                    near = difflib.get_close_matches(layer, [m for m in modules if m], n=3)
                    problems.append(f"layer {layer!r}: no such module" + (f"; did you mean {near}?" if near else ""))
                    continue
                name = layer
            if name in names:
                continue
            names.append(name)
            # A layer is tapped by what it is, not by how the config named it: a block/stage
            # comes from forward_intermediates (timm's own layout: NCHW maps, row-major tokens,
            # where a hook on some models sees channels-last maps or tokens in another order),
            # so `2` and its module name give one result, and predict, which taps by the
            # recorded names, computes what extraction stored.
            if name in indexed and self.has_intermediates:
                self.index_names[indexed.index(name)] = name
            else:
                self.hook_names.append(name)
        if problems:
            raise ConfigError(problems, "backbone.layers")
        self.order = names  # output order follows the config

    # -- capture ------------------------------------------------------------------------
    def _save_output(self, name: str):
        def hook(_module, _inputs, output):
            if isinstance(output, (tuple, list)):
                tensors = [o for o in output if isinstance(o, torch.Tensor)]
                if len(tensors) != 1:  # which one is "the" output? (HRNet's stages return one map per branch)
                    raise ConfigError(f"backbone.layers: module {name!r} returns {len(tensors)} tensors "
                                      f"({[tuple(t.shape) for t in tensors][:4]}), not one map; name a module that returns one")
                output = tensors[0]
            self._captured[name] = output.clone()
        return hook

    def _save_keys_values(self, name: str):
        def hook(_module, _inputs, qkv):
            self._captured[name] = qkv[..., qkv.shape[-1] // 3:].clone()  # drop the queries: [B, T, 2D]
        return hook

    def _save_input(self, name: str):
        def hook(_module, inputs):
            self._captured[name] = inputs[0].clone()
        return hook

    def _forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw layer outputs (CNN maps still [B, C, H, W]) in config order, "embed" first."""
        self._captured = {}
        out: dict[str, torch.Tensor] = {}
        if self.index_names:
            indices = sorted(self.index_names)
            # Cached keys/values and hooked modules need the whole forward, not only up to the deepest index.
            whole = bool(self.kv_names or self.hook_names)
            kwargs = dict(indices=indices, intermediates_only=not self.hook_names, stop_early=not whole)
            params = inspect.signature(self.model.forward_intermediates).parameters
            if self.vit and "return_prefix_tokens" in params:
                # Asked only where there are prefix tokens: timm's relpos ViT fails on it without any.
                kwargs.update(output_fmt="NLC", return_prefix_tokens=self.prefix > 0)
            feats = self.model.forward_intermediates(images, **kwargs)
            if self.hook_names:  # (final features, intermediates): the hooks saw the rest of the forward
                feats = feats[1]
            # timm returns intermediates in sorted index order, whatever order was asked.
            for i, f in zip(indices, feats):
                if isinstance(f, tuple):  # (patch tokens, prefix tokens)
                    f = torch.cat([f[1], f[0]], dim=1)
                out[self.index_names[i]] = f
        else:
            self.model.forward_features(images)
        out.update(self._captured)
        self._captured = {}
        if any(name not in out for name in self.kv_names):
            raise ConfigError(_NO_QKV)
        never_ran = [name for name in self.hook_names if name not in out]
        if never_ran and self.index_names:
            # forward_intermediates walks some models' modules by hand (NFNet's stem, xception's
            # blocks), so their hooks do not fire there: hook every layer, one forward_features.
            self._hook_everything()
            return self._forward(images)
        if never_ran:
            raise ConfigError(
                f"backbone.layers: {never_ran} never run in the backbone's forward_features (the "
                "classifier head and its pooling, e.g. 'fc' or 'global_pool', come after it); "
                "name a module of the feature extractor instead"
            )
        if self.through_final_norm:  # block outputs as the backbone's head would read them
            for name in self.order:
                if _BLOCK.fullmatch(name):
                    # The norm is over channels: as tokens, since XCiT's and CaiT's blocks come
                    # back from forward_intermediates as [B, C, H, W] maps.
                    out[name] = self.model.norm(_as_tokens(out[name]))
        return {name: out[name] for name in ([EMBED] if self.capture_embed else []) + self.order + self.kv_names}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: _as_tokens(t) for name, t in self._forward(images).items()}

    def _hook_everything(self) -> None:
        modules = dict(self.model.named_modules())
        labels = [name for name in self.index_names.values() if name not in modules]
        if labels:  # a feature_info label without a module of its name (HRNet's "stem"): nothing to hook
            raise ConfigError(f"backbone.layers: {labels} can only be taken by index, and {self.hook_names} "
                              "only by a forward hook, which this model's forward_intermediates never reaches; tap them apart")
        for name in self.index_names.values():
            self._handles.append(self.model.get_submodule(name).register_forward_hook(self._save_output(name)))
        self.hook_names = list(self.order)
        self.index_names = {}

    def _probe_specs(self, image_size: tuple[int, int]) -> list[LayerSpec]:
        """Shapes from one dry forward pass rather than from guesses about the architecture."""
        p = next(self.model.parameters())
        with torch.no_grad():
            raw = self._forward(torch.zeros(1, 3, *image_size, device=p.device, dtype=p.dtype))
        # Channels-last maps: timm says so on the model (Swin, MambaOut) or on its patch embedding (SAM's ViT).
        if "NHWC" in (getattr(self.model, "output_fmt", None), getattr(getattr(self.model, "patch_embed", None), "output_fmt", None)):
            hooked = [name for name in self.hook_names if raw[name].ndim == 4
                      and not isinstance(self.model.get_submodule(name), _NCHW_MODULES)]
            if hooked:  # its modules' maps may be [B, H, W, C] or [B, C, H, W]: nothing says which
                raise ConfigError(f"backbone.layers: {hooked}: this model keeps its feature maps channels-last (NHWC), so the "
                                  "layout of a named module's 4-D output is unknown; tap its stages by index "
                                  f"({', '.join(self._index_count_and_names())})")
        return [self._spec(name, t) for name, t in raw.items()]

    def _spec(self, name: str, raw: torch.Tensor) -> LayerSpec:
        t = _as_tokens(raw)
        _, T, D = t.shape
        if not self.vit:
            grid = tuple(raw.shape[2:]) if raw.ndim == 4 else None
            return LayerSpec(name, T, D, 0, grid, None)
        # timm's VisionTransformer says has_class_token; Eva only has cls_token None.
        has_cls = getattr(self.model, "has_class_token", getattr(self.model, "cls_token", None) is not None)
        registers_only = self.prefix > 0 and not has_cls
        if name in self.kv_names:
            return LayerSpec(name, T, D, self.prefix, tuple(self.model.patch_embed.grid_size), int(name[len(KEYS_VALUES):]),
                             role="keys_values", registers_only=registers_only)
        m = _BLOCK.fullmatch(name)
        block = -1 if name == EMBED else (int(m.group(1)) if m else None)
        normed = bool(m) and self.through_final_norm
        patches = T - self.prefix
        side = math.isqrt(max(patches, 0))
        grid = tuple(getattr(self.model.patch_embed, "grid_size", (side, side)))
        if patches > 0 and grid[0] * grid[1] == patches:
            return LayerSpec(name, T, D, self.prefix, grid, block, normed, registers_only=registers_only)
        return LayerSpec(name, T, D, 0, None, block, normed)  # not a token sequence we understand

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _as_tokens(t: torch.Tensor) -> torch.Tensor:
    if t.ndim == 4:  # CNN map [B, C, H, W] -> [B, H*W, C]
        return t.flatten(2).transpose(1, 2)
    if t.ndim == 3:
        return t
    if t.ndim == 2:  # pooled [B, D] -> one token
        return t[:, None, :]
    raise ConfigError(f"backbone.layers: cannot store a layer output of shape {tuple(t.shape)} as tokens")
