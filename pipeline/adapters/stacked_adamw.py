"""AdamW over stacked parameters [N, ...] with a learning rate and weight decay per member.

Row n of every tensor belongs to member n of a FusedAdapters. The update is torch.optim.AdamW's
(decoupled weight decay, bias-corrected moments), applied with lr[n] and weight_decay[n]
broadcast over row n:

    p_n  <- p_n * (1 - lr_n * wd_n)
    m    <- beta1 m + (1 - beta1) g          v <- beta2 v + (1 - beta2) g^2
    p_n  <- p_n - lr_n / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)

Adam's moments are elementwise, so stacking does not couple members: with the same gradients
each row evolves exactly as a separate AdamW would. lr and weight decay are held in the
parameters' dtype (float64 members get float64 hyperparameters, as torch.optim.AdamW's Python
floats would be); `set_lr_factor` rescales every member's base lr for a schedule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch


class StackedAdamW:
    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: Sequence[float] | torch.Tensor,
        weight_decay: Sequence[float] | torch.Tensor,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        self.params = list(params)
        first = self.params[0]
        self.base_lr = torch.as_tensor(lr, dtype=first.dtype, device=first.device)
        self.lr = self.base_lr.clone()
        self.weight_decay = torch.as_tensor(weight_decay, dtype=first.dtype, device=first.device)
        members = first.shape[0]
        for name, values in (("lr", self.lr), ("weight_decay", self.weight_decay)):
            if values.shape != (members,):
                raise ValueError(
                    f"{name} needs one value per member ({members}), got {values.tolist()}"
                )
        self.betas, self.eps = betas, eps
        self.steps = 0
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def subset(self, index: torch.Tensor, params: Sequence[torch.Tensor]) -> StackedAdamW:
        """The optimiser of the members at `index`, over `params` (their rows of this one's
        parameters, in order): their lr, weight decay and moments, at the same step count,
        so each continues exactly as it would have here."""
        out = object.__new__(StackedAdamW)
        out.params = list(params)
        out.base_lr, out.lr, out.weight_decay = self.base_lr[index], self.lr[index], self.weight_decay[index]
        out.betas, out.eps, out.steps = self.betas, self.eps, self.steps
        out.exp_avg = [m[index].clone() for m in self.exp_avg]
        out.exp_avg_sq = [v[index].clone() for v in self.exp_avg_sq]
        return out

    def set_lr_factor(self, factor: float) -> None:
        """lr = base lr * factor for every member (the schedule's multiplier for the next step)."""
        self.lr = self.base_lr * factor

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        self.steps += 1
        bias_correction1 = 1 - beta1**self.steps
        bias_correction2_sqrt = math.sqrt(1 - beta2**self.steps)
        for p, exp_avg, exp_avg_sq in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            per_member = (-1,) + (1,) * (p.dim() - 1)
            lr = self.lr.view(per_member)
            p.mul_(1 - lr * self.weight_decay.view(per_member))
            exp_avg.lerp_(p.grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            p.sub_(lr / bias_correction1 * exp_avg / denom)
