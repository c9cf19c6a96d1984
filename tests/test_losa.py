"""LoSA (pipeline/adapters/losa.py) against oracles written here from its equations.

The oracles read the adapter's parameter tensors but none of its code: the readout is
F.layer_norm / a mean written out, the grid resampling is the adaptive-pooling cell rule
written as loops, LayerNorm and GELU are spelt out. Everything runs in float64, where the
comparisons cannot be decided by rounding.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from cache.schema import LayerSpec
from pipeline.adapters import (
    AdapterConfigError,
    FusedAdapters,
    StackedAdamW,
    build_adapter,
    per_member_cross_entropy,
)
from pipeline.adapters.standardize import Standardizer

NUM_CLASSES = 3
BATCH = 5
RANK = 4

# A ViT store: CLS + 3x3 grid, width 8; "embed" is the block-0 input. One layer of another
# grid (a store can reduce tokens to a k x k grid per layer), one of another width.
VIT = [
    LayerSpec("embed", 10, 8, prefix_tokens=1, grid=(3, 3), block_index=-1),
    LayerSpec("blocks.0", 17, 6, prefix_tokens=1, grid=(4, 4), block_index=0),
    LayerSpec("blocks.1", 10, 8, prefix_tokens=1, grid=(3, 3), block_index=1),
]
# A CNN store: stages of growing width and shrinking grid, one grid not a multiple of the last.
CNN = [
    LayerSpec("stage1", 64, 4, grid=(8, 8)),
    LayerSpec("stage2", 25, 6, grid=(5, 5)),
    LayerSpec("stage3", 4, 10, grid=(2, 2)),
]


def as_layers(specs):
    return {s.name: s for s in specs}


def random_features(specs, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Offset and scaled like real activations, so that the norms have something to remove.
    return {
        s.name: 3.0 + 2.0 * torch.randn(BATCH, s.tokens, s.dim, generator=generator, dtype=torch.float64)
        for s in specs
    }


def build(specs, seed=0, **hparams):
    torch.manual_seed(seed)
    return build_adapter("losa", as_layers(specs), NUM_CLASSES, rank=RANK, **hparams).double()


def random_standardizer(specs, seed=1):
    generator = torch.Generator().manual_seed(seed)
    shift = {s.name: torch.randn(s.tokens, s.dim, generator=generator, dtype=torch.float64) for s in specs}
    scale = {s.name: torch.rand(s.tokens, s.dim, generator=generator, dtype=torch.float64) + 0.5 for s in specs}
    return Standardizer(shift, scale)


# --- oracles -------------------------------------------------------------------------------


def probe_oracle(losa, x_last, pool, norm):
    """The head on the backbone-style readout of the last layer's tokens [B, T, D]."""
    if norm:
        x_last = F.layer_norm(x_last, (x_last.shape[-1],), eps=1e-6)
    prefix = losa.target.prefix_tokens
    z = x_last[:, 0] if pool == "cls" else x_last[:, prefix:].mean(dim=1)
    return z @ losa.head.weight.T + losa.head.bias


def cell_means(patches, source, target):
    """Adaptive average pooling by its definition: output cell (i, j) of an (H, W) grid
    averages input rows floor(i h / H) .. ceil((i + 1) h / H) - 1, and likewise columns."""
    (h, w), (H, W) = source, target
    grid = patches.reshape(patches.shape[0], h, w, patches.shape[-1])
    cells = []
    for i in range(H):
        for j in range(W):
            rows = slice(i * h // H, math.ceil((i + 1) * h / H))
            cols = slice(j * w // W, math.ceil((j + 1) * w / W))
            cells.append(grid[:, rows, cols].mean(dim=(1, 2)))
    return torch.stack(cells, dim=1)


def aligned_oracle(losa, index, tokens):
    spec, target = list(losa.layer_specs.values())[index], losa.target
    p = spec.prefix_tokens
    resampled = torch.cat([tokens[:, :p], cell_means(tokens[:, p:], spec.grid, target.grid)], dim=1)
    aligner = losa.aligners[index]
    return resampled @ aligner.down.weight.T @ aligner.up.weight.T + aligner.up.bias


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    return y if weight is None else y * weight + bias


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def mixer_oracle(block, u):
    token_in, _, token_out = block.token_mlp
    channel_in, _, channel_out = block.channel_mlp
    normed = layer_norm(u, block.token_norm.weight, block.token_norm.bias).transpose(1, 2)  # [B, D, T]
    hidden = gelu(normed @ token_in.weight.T + token_in.bias)
    v = u + (hidden @ token_out.weight.T).transpose(1, 2)
    normed = layer_norm(v, block.channel_norm.weight, block.channel_norm.bias)
    hidden = gelu(normed @ channel_in.weight.T + channel_in.bias)
    return v + hidden @ channel_out.weight.T + channel_out.bias


def losa_oracle(losa, features, pool, norm):
    """The module docstring's equations, term by term."""
    specs = list(losa.layer_specs.values())
    side = 0.0
    for index, (spec, block) in enumerate(zip(specs, losa.side_blocks)):
        side = mixer_oracle(block, side + aligned_oracle(losa, index, features[spec.name]))
    refined = features[specs[-1].name] + losa.gate * layer_norm(side, eps=1e-6)
    return probe_oracle(losa, refined, pool, norm)


# --- step 0: a probe on the last layer's readout ---------------------------------------------

READOUTS = [
    # (layers, hparams, pool, norm the oracle applies)
    pytest.param(VIT, {}, "cls", True, id="vit-default"),
    pytest.param(CNN, {}, "mean", False, id="cnn-default"),
    pytest.param(VIT, {"pool": "mean", "readout_norm": False}, "mean", False, id="vit-mean-raw"),
    pytest.param(CNN, {"readout_norm": True}, "mean", True, id="cnn-mean-normed"),
]


@pytest.mark.parametrize("specs, hparams, pool, norm", READOUTS)
def test_fresh_losa_is_exactly_a_probe_on_the_last_layer_readout(specs, hparams, pool, norm):
    losa = build(specs, **hparams)
    features = random_features(specs)
    assert not losa.gate.any()
    with torch.no_grad():
        logits = losa(features)
        expected = probe_oracle(losa, features[specs[-1].name], pool, norm)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-12)


def test_every_forward_starts_from_the_standardized_features():
    losa = build(VIT)
    features = random_features(VIT)
    standardizer = random_standardizer(VIT)
    losa.standardize_with(standardizer)
    last = VIT[-1].name
    by_hand = (features[last] - standardizer.shift[last]) * standardizer.scale[last]
    with torch.no_grad():
        torch.testing.assert_close(losa(features), probe_oracle(losa, by_hand, "cls", True), rtol=0, atol=1e-12)
        # ... and the side network reads every layer standardized too.
        losa.gate.normal_()
        standardized = {
            s.name: (features[s.name] - standardizer.shift[s.name]) * standardizer.scale[s.name] for s in VIT
        }
        expected = losa_oracle(losa, standardized, "cls", True)
        torch.testing.assert_close(losa(features), expected, rtol=1e-10, atol=1e-12)


# --- the side network is not dead --------------------------------------------------------------


@pytest.mark.parametrize("specs", [VIT, CNN], ids=["vit", "cnn"])
def test_one_step_opens_the_gate_and_the_side_network_then_changes_the_output(specs):
    losa = build(specs)
    features = random_features(specs)
    labels = torch.arange(BATCH) % NUM_CLASSES
    pool, norm = ("cls", True) if specs is VIT else ("mean", False)

    F.cross_entropy(losa(features), labels).backward()
    assert losa.gate.grad.abs().min() > 0  # the gradient reaches every channel of the gate
    side = {n: p for n, p in losa.named_parameters() if not n.startswith(("gate", "head"))}
    assert all(not p.grad.any() for p in side.values())  # ... and stops there, as g = 0

    optimizer = torch.optim.AdamW(losa.parameters(), lr=1e-2)
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        # The probe's part of the output, with the head as it is now, is no longer all of it.
        change = losa(features) - probe_oracle(losa, features[specs[-1].name], pool, norm)
    assert change.abs().max() > 1e-4

    F.cross_entropy(losa(features), labels).backward()
    for name, p in side.items():
        assert p.grad.abs().max() > 1e-8, f"no gradient for {name} after the gate opened"


# --- fused training --------------------------------------------------------------------------

LRS = [1e-3, 3e-3, 1e-2]
WEIGHT_DECAYS = [0.0, 0.01, 0.1]


def side_vector(adapter):
    """Every parameter but the gate and the head: what the first step cannot move."""
    side = [p for n, p in adapter.named_parameters() if not n.startswith(("gate", "head"))]
    return torch.nn.utils.parameters_to_vector(side).detach().clone()


@pytest.mark.parametrize("specs", [VIT, CNN], ids=["vit", "cnn"])
def test_fused_training_equals_training_each_member_alone(specs):
    """Two steps: the first moves only the head and the gate, the second the whole side
    network; float64 end to end so that the tight tolerance holds on any CPU."""
    standardizer = random_standardizer(specs)
    members = [build(specs, seed=seed) for seed in range(len(LRS))]
    for member in members:
        member.standardize_with(standardizer)
    solo_members = [copy.deepcopy(m) for m in members]
    initial_side = [side_vector(m) for m in members]
    steps = [(random_features(specs, seed), torch.tensor([0, 1, 2, 1, 0])) for seed in (10, 11)]

    for adapter, lr, weight_decay in zip(solo_members, LRS, WEIGHT_DECAYS):
        optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=weight_decay)
        for features, labels in steps:
            optimizer.zero_grad()
            F.cross_entropy(adapter(features), labels).backward()
            optimizer.step()

    fused = FusedAdapters(members)
    optimizer = StackedAdamW(fused.parameters(), lr=LRS, weight_decay=WEIGHT_DECAYS)
    for features, labels in steps:
        optimizer.zero_grad()
        per_member_cross_entropy(fused(features), labels).sum().backward()
        optimizer.step()
    trained = fused.unstack()

    features, _ = steps[0]
    for n, (fused_adapter, solo_adapter) in enumerate(zip(trained, solo_members)):
        assert not torch.equal(side_vector(solo_adapter), initial_side[n])  # the side network trained
        for (name, fused_p), solo_p in zip(fused_adapter.named_parameters(), solo_adapter.parameters()):
            torch.testing.assert_close(fused_p, solo_p, rtol=1e-9, atol=1e-10, msg=lambda m: f"member {n}, {name}: {m}")
        with torch.no_grad():
            torch.testing.assert_close(fused_adapter(features), solo_adapter(features), rtol=1e-9, atol=1e-10)


# --- layers of other width and grid ----------------------------------------------------------


@pytest.mark.parametrize("specs", [VIT, CNN], ids=["vit", "cnn"])
def test_layers_of_other_width_and_grid_are_aligned_to_the_last(specs):
    losa = build(specs)
    features = random_features(specs)
    target = specs[-1]
    with torch.no_grad():
        for index, spec in enumerate(specs):
            aligned = losa.aligners[index](features[spec.name])
            assert aligned.shape == (BATCH, target.tokens, target.dim)
            expected = aligned_oracle(losa, index, features[spec.name])
            torch.testing.assert_close(aligned, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("specs, hparams, pool, norm", READOUTS)
def test_an_open_gate_gives_the_equations_of_the_docstring(specs, hparams, pool, norm):
    losa = build(specs, **hparams)
    features = random_features(specs)
    with torch.no_grad():
        losa.gate.normal_()
        torch.testing.assert_close(losa(features), losa_oracle(losa, features, pool, norm), rtol=1e-10, atol=1e-12)


def test_defaults_follow_the_last_layer_and_fit_the_pooling():
    vit, cnn = build(VIT), build(CNN)
    assert (vit.pool, vit.readout_norm, cnn.pool, cnn.readout_norm) == ("cls", True, "mean", False)
    assert vit.head.in_features == VIT[-1].dim
    assert build(VIT, pool="cls_mean").head.in_features == 2 * VIT[-1].dim
    with pytest.raises(AdapterConfigError, match="needs a CLS token, but layer .stage3. has none"):
        build(CNN, pool="cls")


def test_layers_listed_out_of_backbone_order_are_refused():
    """LoSA refines the last layer it lists: listed deep first, it would silently refine a
    shallow one. Where the order is unknown (no block indices: the CNN's stages) the list is taken as given."""
    with pytest.raises(AdapterConfigError, match=r"in backbone order are \['embed', 'blocks.0', 'blocks.1'\]"):
        build(VIT, layers=("blocks.1", "embed", "blocks.0"))
    assert build(VIT, layers=("embed", "blocks.1")).target.name == "blocks.1"
    assert build(CNN, layers=("stage3", "stage1")).target.name == "stage1"
