"""N adapters trained in one fused (vmapped) pass == the same N adapters trained one by one.

Members differ in seed (initial weights), learning rate and weight decay. Each solo run uses
torch.optim.AdamW on the member's own loss; the fused run uses StackedAdamW on the summed
per-member losses. Same batches, same number of steps: the weights must agree.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from cache.schema import LayerSpec
from pipeline.adapters import (
    ADAPTERS,
    FusedAdapters,
    StackedAdamW,
    build_adapter,
    per_member_cross_entropy,
)

NUM_CLASSES = 4
BATCH = 8
STEPS = 4
LRS = [1e-3, 3e-3, 1e-2, 3e-2]
WEIGHT_DECAYS = [0.0, 0.01, 0.05, 0.1]


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=64).eval()


@pytest.fixture(scope="module")
def layers(backbone):
    """test_vit's cache layout: "embed" and "blocks.0..5", CLS + 4x4 grid, width 64."""
    names = ["embed"] + [f"blocks.{i}" for i in range(len(backbone.blocks))]
    return {
        name: LayerSpec(name, 17, 64, prefix_tokens=1, grid=(4, 4), block_index=index - 1)
        for index, name in enumerate(names)
    }


def batches(layers):
    generator = torch.Generator().manual_seed(3)
    for _ in range(STEPS):
        features = {
            name: torch.randn(BATCH, s.tokens, s.dim, generator=generator)
            for name, s in layers.items()
        }
        yield features, torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator)


def members(kind, layers, backbone):
    adapters = []
    for seed in range(len(LRS)):
        torch.manual_seed(seed)
        adapters.append(build_adapter(kind, layers, NUM_CLASSES, backbone_modules=backbone))
    return adapters


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_fused_training_equals_training_each_adapter_alone(kind, layers, backbone):
    fused_members = members(kind, layers, backbone)
    solo_members = [copy.deepcopy(adapter) for adapter in fused_members]
    first, second = (torch.nn.utils.parameters_to_vector(m.parameters()) for m in fused_members[:2])
    assert not torch.equal(first, second)  # the seeds gave different initial weights

    for adapter, lr, weight_decay in zip(solo_members, LRS, WEIGHT_DECAYS):
        optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=weight_decay)
        for features, labels in batches(layers):
            optimizer.zero_grad()
            F.cross_entropy(adapter(features), labels).backward()
            optimizer.step()

    fused = FusedAdapters(fused_members)
    optimizer = StackedAdamW(fused.parameters(), lr=LRS, weight_decay=WEIGHT_DECAYS)
    for features, labels in batches(layers):
        optimizer.zero_grad()
        logits = fused(features)
        assert logits.shape == (len(LRS), BATCH, NUM_CLASSES)
        per_member_cross_entropy(logits, labels).sum().backward()
        optimizer.step()
    trained = fused.unstack()

    features, _ = next(batches(layers))
    for n, (fused_adapter, solo_adapter) in enumerate(zip(trained, solo_members)):
        for (name, fused_p), solo_p in zip(
            fused_adapter.named_parameters(), solo_adapter.parameters()
        ):
            torch.testing.assert_close(
                fused_p, solo_p, atol=1e-5, rtol=1e-4, msg=lambda m: f"member {n}, {name}: {m}"
            )
        with torch.no_grad():
            torch.testing.assert_close(
                fused_adapter(features), solo_adapter(features), atol=1e-5, rtol=1e-4
            )


def test_adapters_of_different_shape_are_not_fused(layers, backbone):
    narrow = build_adapter("inca", layers, NUM_CLASSES, num_queries=1)
    wide = build_adapter("inca", layers, NUM_CLASSES, num_queries=2)
    with pytest.raises(ValueError, match="differ in hparams"):
        FusedAdapters([narrow, wide])
