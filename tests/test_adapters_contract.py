"""The contract every registered adapter kind fulfils, plus each kind's own edge cases.

Parametrized over the registry, so a newly registered kind is covered without editing here.
Features come from the tiny timm "test_vit" (64 wide, 6 blocks, 4x4 grid + CLS at 64 px), the
way stage one caches them: "embed" = block-0 input, "blocks.<i>" = output of block i.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

import pytest
import timm
import torch
from safetensors.torch import load_file

from cache.schema import LayerSpec
from pipeline.adapters import (
    ADAPTERS,
    AdapterConfigError,
    StoreMismatchError,
    build_adapter,
    load_adapter,
    save_adapter,
)
from pipeline.adapters.base import layers_in_backbone_order
from pipeline.adapters.hparams import parse_hparams
from pipeline.adapters.persistence import WEIGHTS_FILE
from tests.conftest import fake_fingerprint

KINDS = sorted(ADAPTERS)
NUM_CLASSES = 4
NUM_SAMPLES = 16
FINGERPRINT = fake_fingerprint(image_size=64)


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=64).eval()


@pytest.fixture(scope="module")
def store(backbone):
    """(layer specs, features, labels) as stage one would cache them for 16 images."""
    torch.manual_seed(1)
    images = torch.randn(NUM_SAMPLES, 3, 64, 64)
    captured = {}
    hook = backbone.blocks[0].register_forward_pre_hook(
        lambda module, args: captured.update(embed=args[0])
    )
    with torch.no_grad():
        intermediates = backbone.forward_intermediates(
            images,
            indices=len(backbone.blocks),
            output_fmt="NLC",
            return_prefix_tokens=True,
            intermediates_only=True,
        )
    hook.remove()
    features = {"embed": captured["embed"]}
    for i, (patches, prefix) in enumerate(intermediates):
        features[f"blocks.{i}"] = torch.cat([prefix, patches], dim=1)
    grid = tuple(backbone.patch_embed.grid_size)
    layers = {
        name: LayerSpec(
            name=name,
            tokens=t.shape[1],
            dim=t.shape[2],
            prefix_tokens=backbone.num_prefix_tokens,
            grid=grid,
            block_index=-1 if name == "embed" else int(name.split(".")[1]),
        )
        for name, t in features.items()
    }
    labels = torch.arange(NUM_SAMPLES) % NUM_CLASSES
    return layers, features, labels


def build(kind, store, backbone, **hparams):
    torch.manual_seed(2)
    return build_adapter(kind, store[0], NUM_CLASSES, backbone_modules=backbone, **hparams)


# --- the contract, for every kind ---------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_logits_have_shape_batch_by_classes(kind, store, backbone):
    adapter = build(kind, store, backbone)
    assert adapter(store[1]).shape == (NUM_SAMPLES, NUM_CLASSES)
    assert set(adapter.required_layers()) <= set(store[0])
    assert adapter.kind == kind


@pytest.mark.parametrize("kind", KINDS)
def test_backward_reaches_every_trainable_parameter_and_no_frozen_one(kind, store, backbone):
    adapter = build(kind, store, backbone)
    if kind == "losa":  # its side output starts gated off (g = 0, losa.py): one step opens it
        optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
        torch.nn.functional.cross_entropy(adapter(store[1]), store[2]).backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.nn.functional.cross_entropy(adapter(store[1]), store[2]).backward()
    for name, p in adapter.named_parameters():
        # Above rounding noise: a parameter the output cannot see (say, a bias that a later
        # LayerNorm removes) gets ~1e-9, which Adam would still turn into full-size steps.
        assert p.grad is not None and p.grad.abs().max() > 1e-6, f"no gradient for {name}"
    assert all(p.grad is None for p in backbone.parameters())
    assert adapter.num_trainable_parameters() == sum(p.numel() for p in adapter.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_gives_identical_logits(kind, store, backbone, tmp_path):
    adapter = build(kind, store, backbone)
    with torch.no_grad():  # move away from the init so a reload at init would not pass
        for p in adapter.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_adapter(adapter, tmp_path, FINGERPRINT, class_names=["a", "b", "c", "d"])

    restored = load_adapter(tmp_path, FINGERPRINT, backbone_modules=backbone)

    assert type(restored) is type(adapter)
    assert torch.equal(restored.eval()(store[1]), adapter.eval()(store[1]))  # eval: no dropout draws
    saved_tensors = load_file(str(tmp_path / WEIGHTS_FILE))
    assert set(saved_tensors) == {name for name, _ in adapter.named_parameters()}
    assert json.loads((tmp_path / "adapter.json").read_text())["class_names"] == list("abcd")


@pytest.mark.parametrize("kind", KINDS)
def test_load_refuses_an_adapter_from_another_store(kind, store, backbone, tmp_path):
    save_adapter(build(kind, store, backbone), tmp_path, FINGERPRINT)
    other_store = fake_fingerprint(image_size=224)
    with pytest.raises(StoreMismatchError, match=r"preprocessing.input_size: saved \[3, 64, 64\], given \[3, 224, 224\]"):
        load_adapter(tmp_path, other_store, backbone_modules=backbone)


@pytest.mark.parametrize("kind", KINDS)
def test_overfits_one_small_batch(kind, store, backbone):
    adapter = build(kind, store, backbone).eval()  # eval: the check below sees no dropout draws
    _, features, labels = store
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    for _ in range(300):
        logits = adapter(features)
        if (logits.argmax(dim=1) == labels).all():
            break
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(logits, labels).backward()
        optimizer.step()
    assert (adapter(features).argmax(dim=1) == labels).all()


@pytest.mark.parametrize("kind", KINDS)
def test_misspelt_hparam_is_named_with_the_nearest_valid_key(kind, store, backbone):
    field = dataclasses.fields(ADAPTERS[kind].Hparams)[0].name
    misspelt = field[:-1]
    with pytest.raises(AdapterConfigError) as error:
        build(kind, store, backbone, **{misspelt: 3})
    message = str(error.value)
    assert repr(misspelt) in message and "3" in message
    assert f"did you mean {field!r}" in message and "valid keys" in message


@pytest.mark.parametrize("kind", KINDS)
def test_hparam_of_the_wrong_type_is_named_with_what_was_expected(kind, store, backbone):
    field = dataclasses.fields(ADAPTERS[kind].Hparams)[0].name
    with pytest.raises(AdapterConfigError) as error:
        build(kind, store, backbone, **{field: {"nested": 1}})
    message = str(error.value)
    assert repr(field) in message and "{'nested': 1}" in message
    assert "expected" in message and "valid keys" in message


# --- registry and hyperparameter parsing ---------------------------------------------------


def test_unknown_kind_lists_known_kinds_and_suggests_the_nearest(store):
    with pytest.raises(AdapterConfigError) as error:
        build_adapter("linaer", store[0], NUM_CLASSES)
    message = str(error.value)
    assert "'linaer'" in message and "did you mean 'linear'" in message
    assert all(kind in message for kind in KINDS)


def test_out_of_range_and_out_of_choice_values_are_explained(store):
    with pytest.raises(AdapterConfigError, match=r"'num_queries' = 0 .*expected an integer >= 1"):
        build_adapter("inca", store[0], NUM_CLASSES, num_queries=0)
    with pytest.raises(AdapterConfigError, match=r"expected one of 'cls', 'mean', 'cls_mean'"):
        build_adapter("linear", store[0], NUM_CLASSES, pool="max")


def test_yaml_spellings_are_coerced_to_the_declared_types():
    @dataclasses.dataclass(frozen=True)
    class Example:
        rate: float = 0.5
        flag: bool = False
        names: tuple[str, ...] | None = None
        mode: Literal["a", "b"] = "a"

    parsed = parse_hparams("example", Example, {"rate": 1, "flag": True, "names": ["x", "y"]})
    assert parsed == Example(rate=1.0, flag=True, names=("x", "y"))
    with pytest.raises(AdapterConfigError, match="expected true or false"):
        parse_hparams("example", Example, {"flag": 1})
    with pytest.raises(AdapterConfigError, match="expected a list of strings or null"):
        parse_hparams("example", Example, {"names": "x"})


def test_vqt_without_backbone_modules_says_what_it_needs(store):
    with pytest.raises(AdapterConfigError, match="backbone_modules"):
        build_adapter("vqt", store[0], NUM_CLASSES)


def test_vqt_rejects_blocks_it_does_not_reimplement(store, backbone):
    class NotABlock(torch.nn.Module):
        pass

    parts = {"blocks": [NotABlock()], "norm": backbone.norm}
    with pytest.raises(AdapterConfigError, match="block 0 is NotABlock"):
        build_adapter("vqt", store[0], NUM_CLASSES, backbone_modules=parts)


def test_missing_layer_is_named_with_the_nearest_available_one(store):
    with pytest.raises(AdapterConfigError, match=r"'block.5' \(did you mean 'blocks.5'\?\)"):
        build_adapter("linear", store[0], NUM_CLASSES, layer="block.5")


def test_layers_are_ordered_by_block_index_not_by_name():
    names = ["blocks.10", "embed", "blocks.9"]
    layers = {n: LayerSpec(n, 5, 8, 1, (2, 2), -1 if n == "embed" else int(n[7:])) for n in names}
    assert layers_in_backbone_order(layers) == ["embed", "blocks.9", "blocks.10"]


# --- linear probe pooling ------------------------------------------------------------------


def test_linear_pooling_reads_cls_and_the_mean_of_non_prefix_tokens():
    spec = LayerSpec("blocks.0", tokens=5, dim=3, prefix_tokens=1, grid=(2, 2), block_index=0)
    tokens = torch.randn(2, 5, 3)
    probe = build_adapter("linear", {spec.name: spec}, NUM_CLASSES, pool="cls_mean")
    expected = probe.head(torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1))
    assert torch.allclose(probe({spec.name: tokens}), expected)


def test_linear_pooling_of_an_already_pooled_layer_picks_the_stored_tokens():
    spec = LayerSpec("pooled", tokens=2, dim=3, prefix_tokens=1, grid=None)  # stored cls_mean
    tokens = torch.randn(2, 2, 3)
    for pool, expected_input in (("cls", tokens[:, 0]), ("mean", tokens[:, 1])):
        probe = build_adapter("linear", {"pooled": spec}, NUM_CLASSES, pool=pool)
        assert torch.allclose(probe({"pooled": tokens}), probe.head(expected_input))


def test_cls_pooling_of_a_cnn_layer_is_refused_clearly():
    spec = LayerSpec("layer4", tokens=4, dim=8, prefix_tokens=0, grid=(2, 2))
    with pytest.raises(AdapterConfigError, match="needs a CLS token.*has none.*use pool='mean'"):
        build_adapter("linear", {"layer4": spec}, NUM_CLASSES, pool="cls")


# --- LoSA on CNN stages --------------------------------------------------------------------


def test_losa_aligns_cnn_stages_of_different_grid_and_width():
    stages = {
        "stage1": LayerSpec("stage1", tokens=64, dim=16, grid=(8, 8)),
        "stage2": LayerSpec("stage2", tokens=16, dim=32, grid=(4, 4)),
        "stage3": LayerSpec("stage3", tokens=4, dim=48, grid=(2, 2)),
    }
    features = {
        name: torch.randn(3, s.tokens, s.dim, requires_grad=True) for name, s in stages.items()
    }
    losa = build_adapter("losa", stages, NUM_CLASSES, rank=4)
    with torch.no_grad():
        losa.gate.fill_(1.0)  # open the side output, which starts gated off
    losa(features).sum().backward()
    assert all(p.grad is not None for p in losa.parameters())
    assert all(t.grad is not None for t in features.values())  # every stage feeds the head
    # stage1's 8x8 map reaches the 2x2 target grid as the means of its 4x4 cells, then 16->4->48.
    stage1 = features["stage1"].detach()
    cell_means = torch.nn.functional.avg_pool2d(stage1.transpose(1, 2).reshape(3, 16, 8, 8), 4)
    expected = losa.aligners[0].up(losa.aligners[0].down(cell_means.flatten(2).transpose(1, 2)))
    assert torch.allclose(losa.aligners[0](stage1), expected)


def test_losa_refuses_pooled_layers_and_mismatched_prefix_tokens():
    vit = LayerSpec("blocks.1", tokens=5, dim=8, prefix_tokens=1, grid=(2, 2), block_index=1)
    pooled = LayerSpec("blocks.0", tokens=1, dim=8, prefix_tokens=1, grid=None, block_index=0)
    cnn = LayerSpec("stage", tokens=4, dim=8, prefix_tokens=0, grid=(2, 2))
    with pytest.raises(AdapterConfigError, match="stored pooled"):
        build_adapter("losa", {"blocks.0": pooled, "blocks.1": vit}, NUM_CLASSES)
    with pytest.raises(AdapterConfigError, match="prefix tokens"):
        build_adapter("losa", {"stage": cnn, "blocks.1": vit}, NUM_CLASSES)
