"""VQT on cached block inputs == VQT run live inside the timm model.

The live version appends each block's query tokens to that block's token sequence and runs
the unmodified timm block with an attention mask: original tokens attend only to original
tokens, queries attend only to original tokens. The queries' outputs are taken out after the
block and not passed on. If the cached formulation is right, (1) the query outputs agree and
(2) the original tokens leave every block exactly as in the plain model, i.e. the cache stays
valid.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from cache.schema import LayerSpec
from pipeline.adapters import VQT, VQTHparams

NUM_QUERIES = 3
ATOL = 1e-5


class QueryAppendingBlock(nn.Module):
    """Runs `block` on [tokens, queries] with the VQT mask; passes on the tokens only."""

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
    """A random-init test ViT with every parameter (layer scales, qk norms, ...) perturbed,
    so that no module is close to identity and each one matters to the comparison."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=64, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


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
    torch.manual_seed(1)
    images = torch.randn(4, 3, 64, 64)
    features, plain_final = plain_run(model, images)
    grid = tuple(model.patch_embed.grid_size)
    layers = {
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
    vqt = VQT(layers, 5, model.blocks, model.norm, VQTHparams(num_queries=NUM_QUERIES))
    with torch.no_grad():
        vqt.queries.normal_()  # unit-scale queries: the init's 0.02 would hide errors

    with torch.no_grad():
        cached_outputs = vqt.query_outputs(vqt.keys_values(features))
        cached_logits = vqt(features)

    live = copy.deepcopy(model)
    live.blocks = nn.Sequential(
        *(QueryAppendingBlock(block, q) for block, q in zip(live.blocks, vqt.queries.detach()))
    )
    with torch.no_grad():
        live_final = live.forward_features(images)

    for i, (wrapper, cached) in enumerate(zip(live.blocks, cached_outputs)):
        torch.testing.assert_close(
            cached,
            wrapper.query_outputs,
            atol=ATOL,
            rtol=1e-5,
            msg=lambda m: f"query outputs of block {i}: {m}",
        )
        torch.testing.assert_close(
            wrapper.token_outputs,
            features[f"blocks.{i}"],
            atol=ATOL,
            rtol=1e-5,
            msg=lambda m: f"token outputs of block {i}: {m}",
        )
    torch.testing.assert_close(live_final, plain_final, atol=ATOL, rtol=1e-5)

    live_head_input = torch.cat(
        [F.normalize(live_final[:, 0], dim=-1)] + [w.query_outputs.flatten(1) for w in live.blocks],
        dim=-1,
    )
    torch.testing.assert_close(cached_logits, vqt.head(live_head_input), atol=ATOL, rtol=1e-5)
