"""N adapters trained in one fused (vmapped) pass == the same N adapters trained one by one.

Members differ in seed (initial weights), learning rate and weight decay. The claim is proved
in three pieces, none of which depends on the CPU's rounding:

- one step of fused gradients equals each member's own gradient, in float32 (before any
  optimiser can amplify rounding noise);
- StackedAdamW equals torch.optim.AdamW fed identical gradients (float64);
- end to end, several steps of fused training equal solo torch.optim.AdamW runs, in float64.
  (In float32, Adam turns rounding noise on near-zero gradients into full-size steps, so the
  same comparison passes or fails with the CPU's instruction set.)
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


def tiny_vit(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=64)
    return model.to(dtype).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def backbone():
    return tiny_vit(torch.float32)


@pytest.fixture(scope="module")
def backbone64():
    return tiny_vit(torch.float64)


@pytest.fixture(scope="module")
def layers(backbone):
    """test_vit's cache layout: "embed" and "blocks.0..5", CLS + 4x4 grid, width 64."""
    names = ["embed"] + [f"blocks.{i}" for i in range(len(backbone.blocks))]
    return {
        name: LayerSpec(name, 17, 64, prefix_tokens=1, grid=(4, 4), block_index=index - 1)
        for index, name in enumerate(names)
    }


def batches(layers, dtype=torch.float32, steps=STEPS):
    generator = torch.Generator().manual_seed(3)
    for _ in range(steps):
        features = {
            name: torch.randn(BATCH, s.tokens, s.dim, generator=generator, dtype=torch.float64).to(dtype)
            for name, s in layers.items()
        }
        yield features, torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator)


def members(kind, layers, backbone, dtype=torch.float32):
    adapters = []
    for seed in range(len(LRS)):
        torch.manual_seed(seed)
        # VQT's query dropout: alone it draws from torch's global generator, fused from the
        # member's own stream (tests/test_train.py: a member's result does not depend on its mates).
        extra = {"dropout": 0.0} if kind == "vqt" else {}
        adapter = build_adapter(kind, layers, NUM_CLASSES, backbone_modules=backbone, **extra)
        adapters.append(adapter.to(dtype))
    return adapters


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_one_fused_step_gives_each_member_its_own_gradient(kind, layers, backbone):
    """float32, one backward: no optimiser between the two computations, so they agree to
    rounding of the gradient itself (relative to the gradient's scale)."""
    fused_members = members(kind, layers, backbone)
    solo_members = [copy.deepcopy(adapter) for adapter in fused_members]
    features, labels = next(batches(layers))
    for adapter in solo_members:
        F.cross_entropy(adapter(features), labels).backward()

    fused = FusedAdapters(fused_members)
    per_member_cross_entropy(fused(features), labels).sum().backward()
    for n, solo in enumerate(solo_members):
        for name, solo_p in solo.named_parameters():
            fused_grad, solo_grad = fused.params[name].grad[n], solo_p.grad
            scale = float(solo_grad.abs().max()) or 1.0
            torch.testing.assert_close(
                fused_grad, solo_grad, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"member {n}, {name}: {m}"
            )


def test_stacked_adamw_equals_torch_adamw_fed_the_same_gradients():
    torch.manual_seed(0)
    shapes = [(3, 5), (7,), (2, 3, 4)]
    initial = [torch.randn(len(LRS), *s, dtype=torch.float64) for s in shapes]
    gradients = [[torch.randn_like(p) * 10.0 ** (-k) for p in initial] for k in range(6)]

    stacked = [p.clone() for p in initial]
    optimizer = StackedAdamW(stacked, lr=LRS, weight_decay=WEIGHT_DECAYS)
    for step, grads in enumerate(gradients):
        optimizer.set_lr_factor(1.0 / (step + 1))  # a schedule changes lr between steps
        for p, g in zip(stacked, grads):
            p.grad = g.clone()
        optimizer.step()

    for n, (lr, wd) in enumerate(zip(LRS, WEIGHT_DECAYS)):
        solo = [p[n].clone().requires_grad_(True) for p in initial]
        reference = torch.optim.AdamW(solo, lr=lr, weight_decay=wd)
        for step, grads in enumerate(gradients):
            for group in reference.param_groups:
                group["lr"] = lr / (step + 1)
            for p, g in zip(solo, grads):
                p.grad = g[n].clone()
            reference.step()
        for p, s in zip(stacked, solo):
            torch.testing.assert_close(p[n], s.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_fused_training_equals_training_each_adapter_alone(kind, layers, backbone64):
    """float64 end to end, so the tight tolerance holds on any CPU."""
    fused_members = members(kind, layers, backbone64, torch.float64)
    solo_members = [copy.deepcopy(adapter) for adapter in fused_members]
    initial = [torch.nn.utils.parameters_to_vector(m.parameters()).clone() for m in fused_members]
    assert not torch.equal(initial[0], initial[1])  # the seeds gave different initial weights

    for adapter, lr, weight_decay in zip(solo_members, LRS, WEIGHT_DECAYS):
        optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=weight_decay)
        for features, labels in batches(layers, torch.float64):
            optimizer.zero_grad()
            F.cross_entropy(adapter(features), labels).backward()
            optimizer.step()

    fused = FusedAdapters(fused_members)
    optimizer = StackedAdamW(fused.parameters(), lr=LRS, weight_decay=WEIGHT_DECAYS)
    for features, labels in batches(layers, torch.float64):
        optimizer.zero_grad()
        logits = fused(features)
        assert logits.shape == (len(LRS), BATCH, NUM_CLASSES)
        per_member_cross_entropy(logits, labels).sum().backward()
        optimizer.step()
    trained = fused.unstack()

    features, _ = next(batches(layers, torch.float64))
    for n, (fused_adapter, solo_adapter) in enumerate(zip(trained, solo_members)):
        assert not torch.equal(torch.nn.utils.parameters_to_vector(solo_adapter.parameters()), initial[n])
        for (name, fused_p), solo_p in zip(fused_adapter.named_parameters(), solo_adapter.parameters()):
            torch.testing.assert_close(
                fused_p, solo_p, atol=1e-10, rtol=1e-9, msg=lambda m: f"member {n}, {name}: {m}"
            )
        with torch.no_grad():
            torch.testing.assert_close(
                fused_adapter(features), solo_adapter(features), atol=1e-10, rtol=1e-9
            )


def test_adapters_of_different_shape_are_not_fused(layers, backbone):
    narrow = build_adapter("inca", layers, NUM_CLASSES, num_queries=1)
    wide = build_adapter("inca", layers, NUM_CLASSES, num_queries=2)
    with pytest.raises(ValueError, match="differ in hparams"):
        FusedAdapters([narrow, wide])
