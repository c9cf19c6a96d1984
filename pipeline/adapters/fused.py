"""Fused training: N adapters of one shape trained with one vmapped forward/backward.

Members must agree on everything that fixes the computation (class, layers, num_classes,
architecture hparams); they may differ in initial weights (seed) and in optimiser settings
(lr, weight decay), which StackedAdamW applies per member. With params[name] the stack
[N, *shape] of the members' parameters:

    logits[n] = functional_call(template, params[.][n], features)     vmapped over n -> [N, B, C]
    loss      = sum_n CE(logits[n], y)

so the gradient of row n of each stack is exactly member n's gradient of its own loss.
Features are shared (vmap in_dims None): whatever depends only on features and frozen modules
(VQT's keys/values, LoSA's grid resampling) runs once for all members, not N times.

The members' own parameters are not updated during training; `unstack()` writes the trained
rows back into them. Borrowed frozen modules (VQT's backbone blocks) are those of the first
member, which is the template.

Randomness (VQT's query dropout) comes in as uniform draws (`Adapter.noise_shape`), each
member's from its own generator seeded by its own seed, one draw per training forward: a
member's masks depend on its seed and its step only, never on which members share its group
or job, nor on their number or order (and a member split off by pruning keeps its stream).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state

from pipeline.adapters.base import Adapter

logger = logging.getLogger(__name__)


# Keeps a member's dropout stream apart from its initialisation (torch.manual_seed(seed)).
NOISE_STREAM = 1


class FusedAdapters:
    def __init__(self, adapters: Sequence[Adapter], seeds: Sequence[int] | None = None):
        """seeds: each member's own seed, for its noise (default: 0, 1, .. by position)."""
        _check_fusable(adapters)
        self.members = list(adapters)
        self.template = self.members[0]
        seeds = range(len(self.members)) if seeds is None else list(seeds)
        if len(seeds) != len(self.members):
            raise ValueError(f"FusedAdapters: {len(seeds)} seeds for {len(self.members)} members")
        # Leaf tensors [N, ...] with requires_grad; these are what the optimiser updates.
        self.params, self.buffers = stack_module_state(self.members)
        device = next(iter(self.params.values())).device  # the members are on their device already
        self._generators = [torch.Generator(device).manual_seed(int(np.random.SeedSequence([seed, NOISE_STREAM]).generate_state(1)[0]))
                            for seed in seeds]
        logger.debug(
            "fused %d %s adapters (%d trainable parameters each)",
            len(self.members),
            self.template.kind,
            self.template.num_trainable_parameters(),
        )

    def __len__(self) -> int:
        return len(self.members)

    def parameters(self) -> list[torch.Tensor]:
        """The stacked parameters, row n belonging to member n (for StackedAdamW)."""
        return list(self.params.values())

    def train(self, mode: bool = True) -> FusedAdapters:
        self.template.train(mode)
        return self

    def eval(self) -> FusedAdapters:
        return self.train(False)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits [N, B, C] of every member on the same batch."""
        noise = self._noise(next(iter(features.values())).shape[0])

        def member_logits(params, buffers, shared_features, member_noise):
            kwargs = {} if member_noise is None else {"noise": member_noise}
            return functional_call(self.template, (params, buffers), (shared_features,), kwargs)

        # randomness="error": randomness comes in as `noise`, drawn per member; a draw from
        # torch's global generator inside would tie a member's result to its group mates.
        return torch.vmap(member_logits, in_dims=(0, 0, None, None if noise is None else 0), randomness="error")(
            self.params, self.buffers, dict(features), noise
        )

    def _noise(self, batch: int) -> torch.Tensor | None:
        """[N, *noise_shape]: each member's next draws from its own generator."""
        shape = self.template.noise_shape(batch)
        if shape is None:
            return None
        first = next(iter(self.params.values()))
        return torch.stack([torch.rand(shape, generator=g, device=first.device, dtype=first.dtype) for g in self._generators])

    __call__ = forward

    def subset(self, index: torch.Tensor) -> FusedAdapters:
        """The members at `index` (in that order), their stacked rows copied as they are now:
        the members pruning keeps training, or those it stops. The template (structure and
        borrowed frozen modules) is shared."""
        out = object.__new__(FusedAdapters)
        out.members = [self.members[i] for i in index.tolist()]
        out.template = self.template
        # Each member's stream goes on where it was (the generators are shared, not copied:
        # a group split by pruning trains only one of the parts).
        out._generators = [self._generators[i] for i in index.tolist()]
        out.params = {n: p.detach()[index].clone().requires_grad_(p.requires_grad) for n, p in self.params.items()}
        out.buffers = {n: b.detach()[index].clone() for n, b in self.buffers.items()}
        return out

    @torch.no_grad()
    def unstack(self) -> list[Adapter]:
        """Write the trained rows back into the member adapters and return them."""
        for n, member in enumerate(self.members):
            for name, tensor in member.named_parameters():
                tensor.copy_(self.params[name][n])
            for name, tensor in member.named_buffers():
                tensor.copy_(self.buffers[name][n])
        return self.members


def per_member_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each member: logits [N, B, C], labels [B] -> [N].

    Sum the result before backward: member n's gradient is then that of its own loss.
    """
    members, batch, classes = logits.shape
    losses = F.cross_entropy(
        logits.reshape(members * batch, classes), labels.repeat(members), reduction="none"
    )
    return losses.view(members, batch).mean(dim=1)


def _check_fusable(adapters: Sequence[Adapter]) -> None:
    if not adapters:
        raise ValueError("FusedAdapters needs at least one adapter")
    first = adapters[0]
    for n, other in enumerate(adapters[1:], start=1):
        for what, a, b in (
            ("class", type(first), type(other)),
            ("layers", first.layer_specs, other.layer_specs),
            ("num_classes", first.num_classes, other.num_classes),
            ("hparams", first.hparams, other.hparams),
        ):
            if a != b:
                raise ValueError(
                    f"adapters 0 and {n} differ in {what} ({a!r} vs {b!r}); only adapters of "
                    "one kind and shape, differing in seed or optimiser settings, can be fused"
                )
