"""VQT on cached block inputs == VQT run live inside the timm model.

The live version appends each block's query tokens to that block's token sequence and runs
the unmodified timm block with an attention mask: original tokens attend only to original
tokens, queries attend only to original tokens. The queries' outputs are taken out after the
block and not passed on. If the cached formulation is right, (1) the query outputs agree and
(2) the original tokens leave every block exactly as in the plain model, i.e. the cache stays
valid. The head's input is then rebuilt by hand from the live run (the official
NORMALIZE_FEATS: the final CLS and each block's flattened query outputs scaled to unit L2
norm) and compared with the adapter's, for every `normalize` choice.

Query dropout is checked the same way: the dropped query tokens VQT feeds each block in
training are taken from the block's first module, and the live model run on exactly those
tokens must give VQT's training-mode output, so the dropout acts on the block inputs (residual
included) and nowhere else.

Everything runs in float64, where the two computations agree far below any tolerance that
float32 rounding, and so the CPU, could decide.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from cache.schema import LayerSpec
from pipeline.adapters import VQT, VQTHparams

NUM_QUERIES = 3
# float64: the live and cached computations differ by ~1e-15 relative, orders below this.
CLOSE = dict(atol=1e-10, rtol=1e-10)
NORMALIZE_CHOICES = ("per_block", "cls", "none")


class QueryAppendingBlock(nn.Module):
    """Runs `block` on [tokens, queries] with the VQT mask; passes on the tokens only.

    queries: [M, D], the same for every sample, or [B, M, D], one set per sample."""

    def __init__(self, block: nn.Module, queries: torch.Tensor):
        super().__init__()
        self.block, self.queries = block, queries
        self.query_outputs = None
        self.token_outputs = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, num_tokens, _ = tokens.shape
        queries = self.queries.expand(batch, -1, -1)
        total = num_tokens + queries.shape[1]
        # True = may attend. Every row (token or query) sees the original tokens only.
        mask = torch.zeros(total, total, dtype=torch.bool)
        mask[:, :num_tokens] = True
        out = self.block(torch.cat([tokens, queries], dim=1), attn_mask=mask)
        self.token_outputs, self.query_outputs = out[:, :num_tokens], out[:, num_tokens:]
        return self.token_outputs


def randomized_model(name: str, **kwargs) -> nn.Module:
    """A random-init float64 test ViT with every parameter (layer scales, qk norms, ...)
    perturbed, so that no module is close to identity and each one matters to the comparison."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=64, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.double().eval()


def random_images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(4, 3, 64, 64, dtype=torch.float64)


def plain_run(model: nn.Module, images: torch.Tensor):
    """Cached features ("embed", "blocks.<i>") and the final normed tokens of the plain model."""
    features = {}
    hooks = [
        model.blocks[0].register_forward_pre_hook(lambda m, args: features.update(embed=args[0]))
    ]
    for i, block in enumerate(model.blocks):
        hooks.append(
            block.register_forward_hook(
                lambda m, args, out, i=i: features.update({f"blocks.{i}": out})
            )
        )
    with torch.no_grad():
        final = model.forward_features(images)
    for hook in hooks:
        hook.remove()
    return features, final


def layer_specs(model: nn.Module, features) -> dict[str, LayerSpec]:
    grid = tuple(model.patch_embed.grid_size)
    return {
        layer: LayerSpec(
            layer,
            t.shape[1],
            t.shape[2],
            model.num_prefix_tokens,
            grid,
            -1 if layer == "embed" else int(layer.split(".")[1]),
        )
        for layer, t in features.items()
    }


def build_vqt(model: nn.Module, features, **hparams) -> VQT:
    """VQT on `model`'s blocks, with unit-scale queries (the init's 0.02 would hide errors)."""
    torch.manual_seed(2)
    vqt = VQT(
        layer_specs(model, features), 5, model.blocks, model.norm,
        VQTHparams(num_queries=NUM_QUERIES, **hparams),
    ).double()
    with torch.no_grad():
        vqt.queries.normal_()
    return vqt


def final_layer(model: nn.Module) -> str:
    return f"blocks.{len(model.blocks) - 1}"


def live_run(model: nn.Module, images: torch.Tensor, queries):
    """The model run with queries[l] appended to block l's tokens: (wrapped blocks, final)."""
    live = copy.deepcopy(model)
    live.blocks = nn.Sequential(
        *(QueryAppendingBlock(block, q) for block, q in zip(live.blocks, queries))
    )
    with torch.no_grad():
        final = live.forward_features(images)
    return live.blocks, final


def unit(v: torch.Tensor) -> torch.Tensor:
    """v / ||v||_2 over the last dim, written out (no F.normalize, as the adapter uses)."""
    return v / v.square().sum(dim=-1, keepdim=True).sqrt()


def expected_head_input(final: torch.Tensor, wrappers, normalize: str) -> torch.Tensor:
    """The official head input from a live run: final CLS, then every block's flattened outputs."""
    cls = final[:, 0]
    outputs = [w.query_outputs.flatten(1) for w in wrappers]
    if normalize != "none":
        cls = unit(cls)
    if normalize == "per_block":
        outputs = [unit(o) for o in outputs]
    return torch.cat([cls, *outputs], dim=-1)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("test_vit", {}),  # CLS token, no layer scale
        ("test_vit2", {}),  # register token only, layer scale
        ("test_vit4", {}),  # RMSNorm, layer scale
        ("test_vit", {"qk_norm": True}),
    ],
)
def test_cached_vqt_equals_live_vqt_and_leaves_the_tokens_untouched(name, kwargs):
    model = randomized_model(name, **kwargs)
    images = random_images()
    features, plain_final = plain_run(model, images)
    # Default hparams (dropout 0.1): eval mode must switch the dropout off.
    vqt = build_vqt(model, features).eval()

    with torch.no_grad():
        keys_values = vqt.keys_values(features)
        cached_outputs = vqt.query_outputs(keys_values)
    wrappers, live_final = live_run(model, images, vqt.queries.detach())

    for i, (wrapper, cached) in enumerate(zip(wrappers, cached_outputs)):
        torch.testing.assert_close(
            cached, wrapper.query_outputs, **CLOSE, msg=lambda m: f"query outputs of block {i}: {m}"
        )
        torch.testing.assert_close(
            wrapper.token_outputs,
            features[f"blocks.{i}"],
            **CLOSE,
            msg=lambda m: f"token outputs of block {i}: {m}",
        )
    torch.testing.assert_close(live_final, plain_final, **CLOSE)

    for normalize in NORMALIZE_CHOICES:
        adapter = build_vqt(model, features, normalize=normalize).eval()
        adapter.load_state_dict(vqt.state_dict())
        expected = expected_head_input(live_final, wrappers, normalize)
        with torch.no_grad():
            head_input = adapter.head_input(keys_values, features[final_layer(model)])
            logits = adapter(features)
        torch.testing.assert_close(head_input, expected, **CLOSE, msg=lambda m: f"{normalize}: {m}")
        by_hand = expected @ vqt.head.weight.detach().T + vqt.head.bias.detach()
        torch.testing.assert_close(logits, by_hand, **CLOSE, msg=lambda m: f"{normalize}: {m}")


def test_per_block_normalisation_gives_every_block_unit_length():
    """With M > 1 the official norm spans a block's M queries together, not each query."""
    model = randomized_model("test_vit")
    features, _ = plain_run(model, random_images())
    vqt = build_vqt(model, features).eval()
    with torch.no_grad():
        head_input = vqt.head_input(vqt.keys_values(features), features[final_layer(model)])
    dim = model.embed_dim
    chunks = head_input.split([dim] + [NUM_QUERIES * dim] * len(model.blocks), dim=-1)
    for chunk in chunks:
        torch.testing.assert_close(chunk.square().sum(dim=-1), torch.ones(len(chunk), dtype=torch.float64))
    per_query = chunks[1].unflatten(-1, (NUM_QUERIES, dim)).square().sum(dim=-1)
    assert (per_query < 0.99).all()  # each query alone is shorter than one


def test_query_dropout_acts_on_each_blocks_query_inputs_with_a_mask_per_sample():
    model = randomized_model("test_vit")
    images = random_images()
    features, _ = plain_run(model, images)
    # p = 0.5: kept values are scaled by exactly 2, so the mask can be checked bit for bit.
    vqt = build_vqt(model, features, dropout=0.5).train()
    with torch.no_grad():
        keys_values = vqt.keys_values(features)

    # What each block receives as queries: the input of its first module, norm1.
    dropped = []
    hooks = [
        block.norm1.register_forward_pre_hook(lambda m, args: dropped.append(args[0]))
        for block in model.blocks
    ]
    torch.manual_seed(3)
    with torch.no_grad():
        head_input = vqt.head_input(keys_values, features[final_layer(model)])
    for hook in hooks:
        hook.remove()

    batch = images.shape[0]
    queries = vqt.queries.detach()
    assert len(dropped) == len(model.blocks)
    for i, (inputs, q) in enumerate(zip(dropped, queries)):
        assert inputs.shape == (batch, NUM_QUERIES, model.embed_dim)
        kept = inputs != 0
        assert torch.equal(inputs, torch.where(kept, 2 * q, torch.zeros_like(inputs))), i
        assert 0.3 < kept.double().mean() < 0.7, i
        assert not torch.equal(kept[0], kept[1]), f"block {i}: samples share one mask"

    # The live model fed exactly these dropped tokens gives VQT's training output: nothing
    # else is dropped, and the residual carries the dropped tokens as the official code does.
    wrappers, live_final = live_run(model, images, dropped)
    torch.testing.assert_close(head_input, expected_head_input(live_final, wrappers, "per_block"), **CLOSE)
