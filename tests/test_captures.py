"""Every kind of layer capture equals an oracle that shares no code with the capture: the
backbone's modules called by hand, in float64, on a CNN with in-place ops (ResNet), an
EfficientNet and a ViT. Index layers, named modules, ViT block inputs and cached keys/values."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from cache import ConfigError
from pipeline.backbones.taps import LayerTaps

SIZE = 64


def model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, num_classes=0, **({"img_size": SIZE} if "vit" in name else {}))
    m = m.double().eval().requires_grad_(False)
    # Non-trivial BatchNorm statistics, so a norm is not an identity at init.
    for module in m.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return m


def images() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C], row-major, written out independently of the taps."""
    b, c, h, w = feature_map.shape
    return feature_map.permute(0, 2, 3, 1).reshape(b, h * w, c)


def capture(m, layers, block_input=False, cache_kv=False, through_final_norm=False) -> dict[str, torch.Tensor]:
    taps = LayerTaps(m, tuple(layers), block_input, (SIZE, SIZE), cache_kv, through_final_norm)
    try:
        return taps(images())
    finally:
        taps.close()


def assert_exact(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for name, ref in expected.items():
        torch.testing.assert_close(got[name], ref, rtol=1e-12, atol=1e-12, msg=lambda msg: f"layer {name}: {msg}")


def test_resnet_named_modules_before_in_place_ops_and_stage_indices():
    """layer2.0.bn1 is followed by an in-place ReLU and layer4.0.bn2 by the in-place residual
    add; both must be stored as the norm returned them."""
    m = model("test_resnet")
    x = images()
    stem_bn = m.bn1(m.conv1(x))
    act1 = F.relu(stem_bn)
    layer1 = m.layer1(m.maxpool(act1))
    layer2 = m.layer2(layer1)
    layer3 = m.layer3(layer2)
    layer4 = m.layer4(layer3)
    block2, block4 = m.layer2[0], m.layer4[0]
    expected = {
        "bn1": tokens(stem_bn),
        "layer2.0.bn1": tokens(block2.bn1(block2.conv1(layer1))),
        "layer4.0.bn2": tokens(block4.bn2(block4.conv2(F.relu(block4.bn1(block4.conv1(layer3)))))),
        "layer3": tokens(layer3),
    }
    assert_exact(capture(m, list(expected)), expected)
    # Stage indices (timm's feature_info order: act1, layer1..layer4) without named modules:
    # forward_intermediates, checked against the same hand computation.
    indexed = capture(m, [0, 1, 2, 4])
    assert_exact(indexed, {"act1": tokens(act1), "layer1": tokens(layer1), "layer2": tokens(layer2), "layer4": tokens(layer4)})


def test_efficientnet_named_modules_and_stage_indices():
    m = model("test_efficientnet")
    x = images()
    stem = m.bn1(m.conv_stem(x))
    stages = []
    for stage in m.blocks:
        stages.append(stage(stages[-1] if stages else stem))
    inner = m.blocks[1][0]
    expected = {
        "bn1": tokens(stem),
        "blocks.1.0.conv_exp": tokens(inner.conv_exp(stages[0])),
        "blocks.1.0.bn1": tokens(inner.bn1(inner.conv_exp(stages[0]))),
        "blocks.2": tokens(stages[2]),
        "conv_head": tokens(m.conv_head(stages[-1])),
    }
    assert_exact(capture(m, list(expected)), expected)
    # Index layers follow feature_info; compare each to the stage it names.
    names = [f["module"] for f in m.feature_info]
    by_module = {"bn1": stem, **{f"blocks.{i}": s for i, s in enumerate(stages)}}
    got = capture(m, [1, -1])
    assert_exact(got, {names[1]: tokens(by_module[names[1]]), names[-1]: tokens(by_module[names[-1]])})


def test_vit_blocks_named_modules_block_input_and_keys_values():
    m = model("test_vit")
    x = images()
    h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
    inputs, outputs = [], []
    for block in m.blocks:
        inputs.append(h)
        h = block(h)
        outputs.append(h)
    block2 = m.blocks[2]
    width = m.embed_dim
    expected = {
        "embed": inputs[0],
        "blocks.0": outputs[0],
        "blocks.5": outputs[5],
        "blocks.2.attn": block2.attn(block2.norm1(inputs[2])),
        **{f"kv.{i}": F.linear(b.norm1(inputs[i]), b.attn.qkv.weight[width:], b.attn.qkv.bias[width:])
           for i, b in enumerate(m.blocks)},
    }
    got = capture(m, [0, -1, "blocks.2.attn"], block_input=True, cache_kv=True)
    assert_exact(got, expected)
    # Index layers alone (forward_intermediates, the fast path) agree with the same oracle.
    assert_exact(capture(m, [0, -1]), {"blocks.0": outputs[0], "blocks.5": outputs[5]})


def test_vit_block_outputs_through_the_final_norm():
    """backbone.through_final_norm: block outputs after the model's final norm; the block-0
    input and named sub-modules stay as they were; each block's spec records it."""
    m = model("test_vit")
    h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images()))))
    embed, outputs = h, []
    for block in m.blocks:
        h = block(h)
        outputs.append(h)
    ln = m.norm  # written out: LayerNorm over channels with the model's affine
    normed = {i: F.layer_norm(outputs[i], (m.embed_dim,), ln.weight, ln.bias, ln.eps) for i in (0, 5)}
    with_hooks = capture(m, [0, -1, "blocks.2.attn"], block_input=True, through_final_norm=True)
    assert_exact({k: v for k, v in with_hooks.items() if k != "blocks.2.attn"},
                 {"embed": embed, "blocks.0": normed[0], "blocks.5": normed[5]})
    assert_exact(capture(m, [0, -1], through_final_norm=True), {"blocks.0": normed[0], "blocks.5": normed[5]})
    taps = LayerTaps(m, (0, "blocks.2.attn"), True, (SIZE, SIZE), through_final_norm=True)
    assert {s.name: s.through_final_norm for s in taps.specs} == {"embed": False, "blocks.0": True, "blocks.2.attn": False}
    taps.close()
    with pytest.raises(ConfigError, match="only a ViT's block outputs"):
        LayerTaps(model("test_resnet"), (-1,), False, (SIZE, SIZE), through_final_norm=True)
    # An average-pool ViT norms after pooling: its `norm` is an Identity, and "through the
    # final norm" would record un-normed blocks as normed.
    gap = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=SIZE, global_pool="avg", fc_norm=True)
    assert isinstance(gap.norm, torch.nn.Identity)
    with pytest.raises(ConfigError, match="no final norm over its tokens"):
        LayerTaps(gap, (-1,), False, (SIZE, SIZE), through_final_norm=True)


def test_xcit_block_outputs_through_the_final_norm():
    """XCiT's blocks come back from forward_intermediates as [B, C, H, W] maps (its class token
    joins after them): the final norm, over channels, crashed on them."""
    m = model("xcit_nano_12_p16_224")
    x = images()
    h, (hp, wp) = m.patch_embed(x)
    h = h + m.pos_embed(x.shape[0], hp, wp).flatten(2).transpose(1, 2)  # [B, C, Hp, Wp] -> [B, N, C]
    outputs = []
    for block in m.blocks:
        h = block(h, hp, wp)
        outputs.append(h)
    ln = m.norm
    normed = {i: F.layer_norm(outputs[i], (m.embed_dim,), ln.weight, ln.bias, ln.eps) for i in (0, 11)}
    assert_exact(capture(m, [0, -1], through_final_norm=True), {"blocks.0": normed[0], "blocks.11": normed[11]})
    assert_exact(capture(m, [0, -1]), {"blocks.0": outputs[0], "blocks.11": outputs[11]})


@pytest.mark.parametrize("name", ["fc", "global_pool", "head"])
def test_a_module_the_forward_never_runs_is_refused_by_name(name):
    m = model("test_resnet") if name != "head" else model("test_vit")
    with pytest.raises(ConfigError, match=rf"\['{name}'\] never run in the backbone's forward_features"):
        LayerTaps(m, (name,), False, (SIZE, SIZE))


def test_channels_last_stages_are_stored_as_tokens_by_index_or_by_name():
    """MambaOut keeps its maps [B, H, W, C] (output_fmt NHWC), which a hook on a stage sees. A
    stage named by its index or by its module name is its map as row-major tokens either way
    (extraction may get the index and predict the name); a named module whose 4-D output has
    no stated layout is refused."""
    m = model("test_mambaout")
    x = images()
    s1 = m.stages[1](m.stages[0](m.stem(x)))  # [B, H, W, C]
    expected = {"stages.1": s1.reshape(s1.shape[0], -1, s1.shape[-1])}
    assert_exact(capture(m, [1]), expected)
    assert_exact(capture(m, ["stages.1"]), expected)
    with pytest.raises(ConfigError, match=r"\['stem'\]: this model keeps its feature maps channels-last"):
        capture(m, [1, "stem"])


def test_a_vit_with_registers_and_no_class_token_is_never_read_as_if_token_0_were_one():
    """timm's *_reg4_gap ViTs: 4 register tokens, no CLS. Token 0 is a register, so every
    "CLS" readout (store.tokens cls/cls_mean, pool cls, VQT's final CLS) is refused, and LoSA
    reads out the patch mean, as the model's own head does."""
    from cache import LayerSpec
    from pipeline.adapters import AdapterConfigError, build_adapter
    from pipeline.backbones.tokens import reduced_spec

    torch.manual_seed(0)
    m = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=SIZE, class_token=False, reg_tokens=4,
                          global_pool="avg").double().eval()
    taps = LayerTaps(m, (-1,), False, (SIZE, SIZE))
    spec = taps.specs[0]
    taps.close()
    assert (spec.prefix_tokens, spec.registers_only, spec.has_class_token) == (4, True, False)
    # timm's Eva (vit_*_rope_reg*_gap) says so by cls_token None alone.
    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=0, img_size=28, class_token=False,
                            num_reg_tokens=2, depth=1).eval()
    eva_taps = LayerTaps(eva, (-1,), False, (28, 28))
    assert [(s.prefix_tokens, s.registers_only) for s in eva_taps.specs] == [(2, True)]
    eva_taps.close()
    assert LayerSpec.from_json(spec.to_json()) == spec
    for mode in ("cls", "cls_mean"):
        with pytest.raises(ConfigError, match="needs a CLS token.*registers only"):
            reduced_spec(spec, mode, 2)
    layers = {spec.name: spec}
    with pytest.raises(AdapterConfigError, match="pool='cls' needs a CLS token"):
        build_adapter("linear", layers, 3, layer=spec.name, pool="cls")
    assert build_adapter("losa", layers, 3).pool == "mean"
    with_cls = LayerSpec(spec.name, spec.tokens, spec.dim, 4, spec.grid, spec.block_index)  # a CLS and 3 registers
    assert with_cls.has_class_token and build_adapter("losa", {spec.name: with_cls}, 3).pool == "cls"


def test_keys_values_of_an_attention_without_a_qkv_module_call_are_refused():
    """BEiT and EVA compute q, k, v with their own biases, never calling attn.qkv as a module:
    no hook fires, and the store would lack every kv layer (a bare KeyError before)."""
    torch.manual_seed(0)
    beit = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=1, embed_dim=32, num_heads=2)
    with pytest.raises(ConfigError, match=r"backbone.cache_kv: this ViT's attention has no fused qkv projection that it calls as a module"):
        LayerTaps(beit.eval(), (-1,), True, (32, 32), cache_kv=True)


def test_a_grid_larger_than_the_layers_is_refused(tmp_path):
    """Pooling a 4x4 patch grid to 5x5 repeats tokens (25 stored, 16 distinct, recorded as a 5x5
    grid): a new store refuses it; predict recomputes an older one as it was made."""
    from pipeline.runners.extract import plan_extraction
    from tests.conftest import tiny_config, write_image_folder

    images = write_image_folder(tmp_path / "images")
    assert {s.grid for s in plan_extraction(tiny_config(tmp_path, images, "store.tokens=grid", "store.grid_size=4")).specs} == {(4, 4)}
    with pytest.raises(ConfigError, match=r"store.grid_size: 5 exceeds the grid of layer\(s\) embed \(4, 4\), blocks.0 \(4, 4\)"):
        plan_extraction(tiny_config(tmp_path, images, "store.tokens=grid", "store.grid_size=5"))


def test_hrnet_stages_by_label_and_a_module_that_returns_several_maps():
    """HRNet's feature_info labels its stages "stem", "stage1".. (not all module names): named
    so (as predict names the recorded layers) they are the indexed stages. Its stage modules
    return one map per resolution branch: which to store is not the hook's to guess."""
    torch.manual_seed(0)
    m = timm.create_model("hrnet_w18_small", pretrained=False, num_classes=0).eval()
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    by_index, by_label = LayerTaps(m, (0, 2), False, (SIZE, SIZE)), LayerTaps(m, ("stem", "stage2"), False, (SIZE, SIZE))
    a, b = by_index(x), by_label(x)
    by_index.close()
    by_label.close()
    assert list(a) == ["stem", "stage2"] and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match=r"module 'stage3.0' returns 3 tensors .* not one map"):
        LayerTaps(m, ("stage3.0",), False, (SIZE, SIZE))


def test_models_whose_forward_intermediates_differs_from_their_forward():
    """NFNet's forward_intermediates calls its stem's parts by hand, so a hook on "stem" never
    fires there: a stage index beside it falls back to hooks, with the values each gives alone.
    The relpos ViT has no prefix tokens, which its forward_intermediates cannot be asked for.
    SAM's ViT keeps channels-last maps, said by its patch embedding: named 4-D modules refused."""
    nf = model("test_nfnet")
    alone = {**capture(nf, [1]), **capture(nf, ["stem"])}
    assert_exact(capture(nf, [1, "stem"]), alone)
    relpos = timm.create_model("test_vit_relpos", pretrained=False, num_classes=0, img_size=SIZE).double().eval()
    x = images()
    assert relpos.cls_token is None and relpos.shared_rel_pos is None  # its forward_features, written out
    assert_exact(capture(relpos, [0]), {"blocks.0": relpos.blocks[0](relpos.patch_embed(x), shared_rel_pos=None)})
    sam = timm.create_model("samvit_base_patch16", pretrained=False, num_classes=0, img_size=SIZE, depth=1, embed_dim=32, num_heads=2,
                            global_attn_indexes=(), neck_chans=16).eval()
    with pytest.raises(ConfigError, match=r"\['patch_embed'\]: this model keeps its feature maps channels-last"):
        LayerTaps(sam, ("patch_embed",), False, (SIZE, SIZE))
    # A convolution's output is [B, C, H, W] by definition, in a channels-last model too (a ViT
    # with dynamic_img_size embeds its patches channels-last after its projection).
    dyn = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=SIZE, dynamic_img_size=True).double().eval()
    assert dyn.patch_embed.output_fmt == "NHWC"
    assert_exact(capture(dyn, ["patch_embed.proj"]), {"patch_embed.proj": tokens(dyn.patch_embed.proj(images()))})
    with pytest.raises(ConfigError, match=r"\['patch_embed'\]: this model keeps its feature maps channels-last"):
        capture(dyn, ["patch_embed"])
