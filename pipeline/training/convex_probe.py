"""The linear probe fitted exactly: full-batch multinomial logistic regression, L-BFGS in float64.

SGD only approaches the probe's optimum; the problem is convex, so it can be solved outright.
On pooled features z_i (one row per sample, as pipeline/adapters/pooling.py produces them):

    standardise   x_i = (z_i - mean) / std           mean, std over the training rows, float64
    minimise      F(W, b) = mean_i CE(x_i W^T + b, y_i) + (l2 / 2) ||W||_F^2     (b not penalised)
    fold          W' = W / std,  b' = b - W' mean     so that  z W'^T + b' = x W^T + b

W', b' are a plain linear map of the raw pooled features, the LinearProbe's head as it stands:

    probe.head.weight.data.copy_(choice.weight); probe.head.bias.data.copy_(choice.bias)

Relation to scikit-learn (pipeline/benchmarking/sklearn_reference.py): LogisticRegression(C)
minimises 0.5 ||W||^2 + C * sum_i CE, which is C n times F with l2 = 1 / (C n); same minimiser.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ArrayLike = torch.Tensor | np.ndarray


@dataclass(frozen=True)
class FitInfo:
    """How one L-BFGS fit ended. grad_max is the largest |component| of dF/d(W, b).

    stop: "gtol"     grad_max <= gtol;
          "stalled"  the line search found no lower F: its decrease is below F's float64
                     rounding, so the point is the optimum to working precision;
          "max_iter" max_iter iterations (or 2 max_iter evaluations) ran out: not converged.
    """

    l2: float
    iterations: int
    evaluations: int
    loss: float  # F(W, b) at the returned solution, penalty included
    grad_max: float
    gtol: float
    stop: str

    @property
    def converged(self) -> bool:
        return self.stop != "max_iter"

    def to_dict(self) -> dict:
        return {**asdict(self), "converged": self.converged}


@dataclass(frozen=True)
class L2Choice:
    """The l2 chosen on validation and its probe, folded onto raw pooled features (float64)."""

    l2: float
    weight: torch.Tensor  # W' [C, D] float64
    bias: torch.Tensor  # b' [C] float64
    l2_grid: tuple[float, ...]  # in the order fitted: largest first
    val_accuracies: tuple[float, ...]  # aligned with l2_grid
    infos: tuple[FitInfo, ...]  # aligned with l2_grid


def _as_f64(x: ArrayLike, device: torch.device | None = None) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64, device=device)


def _check_problem(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float) -> None:
    problems = []
    if x.ndim != 2:
        problems.append(f"x must be [n, D], got shape {tuple(x.shape)} instead")
    if y.ndim != 1 or (x.ndim >= 1 and y.shape[0] != x.shape[0]):
        problems.append(f"y must be [n] with n = {x.shape[0] if x.ndim else '?'}, got shape {tuple(y.shape)} instead")
    if num_classes < 2:
        problems.append(f"num_classes must be >= 2, got {num_classes} instead")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        problems.append(f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}] instead")
    if not l2 >= 0:
        problems.append(f"l2 must be >= 0, got {l2} instead")
    if problems:
        raise ValueError("fit_logistic_lbfgs: " + "; ".join(problems))


def fit_logistic_lbfgs(
    x_train: ArrayLike,
    y_train: ArrayLike,
    num_classes: int,
    l2: float,
    *,
    gtol: float = 1e-10,
    max_iter: int = 2000,
    history_size: int = 20,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, FitInfo]:
    """Minimise F(W, b) = mean_i CE(x_i W^T + b, y_i) + (l2 / 2) ||W||_F^2; the bias is not penalised.

    Full batch, torch.optim.LBFGS with strong-Wolfe line search, everything in float64 on
    x_train's device. Stops when max_i |dF/dtheta_i| <= gtol (the infinity norm of the gradient
    over W and b, the quantity scipy's `gtol` bounds, to which sklearn passes its `tol`), when the
    line search can no longer lower F in float64, or after `max_iter` iterations; `info.stop`
    says which, and only the last is not converged. Near the optimum F - F* <~ |grad|^2 / (2 l2)
    drops below F's rounding (eps |F|) once |grad| ~ sqrt(eps |F| l2), about 1e-10 to 1e-9 for
    standardised features and l2 in [1e-6, 1]: the default gtol = 1e-10 sits at that floor, so
    a fit ends either there or stalled just above it, at the float64 optimum either way.

    Starts from W = 0, b = 0 (deterministic), or from `init` (a warm start). From zero, every
    gradient has sum_c = 0 over classes, so the returned b and the columns of W sum to zero over
    classes: the shift that softmax ignores is pinned.

    Relation to sklearn: LogisticRegression(C=C) minimises 0.5 ||W||^2 + C sum_i CE, which is
    (C n) F with l2 = 1 / (C n); the minimisers coincide (b up to a common shift). This holds for
    num_classes >= 3; for two classes sklearn fits one binomial vector w, which equals W1 - W0
    of ours at l2 = 2 / (C n). Every class should appear in y_train: the bias of an absent
    class is unpenalised and has no finite optimum (the fit drives it to a large negative value).

    Returns W [C, D] and b [C] (float64, x_train's device) and a FitInfo.
    """
    x = _as_f64(x_train)
    y = torch.as_tensor(y_train, device=x.device).long()
    _check_problem(x, y, num_classes, l2)
    present = torch.bincount(y, minlength=num_classes)
    if bool((present == 0).any()):
        logger.warning("classes %s are absent from the training rows; their bias has no finite optimum",
                       torch.nonzero(present == 0).flatten().tolist())

    d = x.shape[1]
    if init is None:
        weight = torch.zeros(num_classes, d, dtype=torch.float64, device=x.device)
        bias = torch.zeros(num_classes, dtype=torch.float64, device=x.device)
    else:
        weight, bias = (_as_f64(t, x.device).clone() for t in init)
    weight.requires_grad_(True)
    bias.requires_grad_(True)

    def objective() -> torch.Tensor:
        return F.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()

    # tolerance_change=0: stop on the gradient, not on a small loss change (the default 1e-9
    # would stop far from the optimum of a loss near 1e-3); a stalled line search still ends it.
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter,
                                  tolerance_grad=gtol, tolerance_change=0.0, history_size=history_size,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)
    state = optimizer.state[weight]
    iterations, evaluations = int(state.get("n_iter", 0)), int(state.get("func_evals", 0))
    loss = closure()  # F and its gradient at the point returned, for the report
    grad_max = max(float(weight.grad.abs().max()), float(bias.grad.abs().max()))
    if grad_max <= gtol:
        stop = "gtol"
    elif iterations >= max_iter or evaluations >= 2 * max_iter:
        stop = "max_iter"
    else:
        stop = "stalled"
    info = FitInfo(l2=float(l2), iterations=iterations, evaluations=evaluations, loss=float(loss.detach()),
                   grad_max=grad_max, gtol=gtol, stop=stop)
    if not info.converged:
        logger.warning("L-BFGS ran out of iterations before |grad|_max <= %.1e: %s", gtol, info)
    return weight.detach(), bias.detach(), info


def standardize_fit(x_train: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std [D] in float64, as sklearn's StandardScaler: ddof=0, a zero std taken as 1."""
    x = _as_f64(x_train)
    mean = x.mean(dim=0)
    std = x.std(dim=0, correction=0)
    return mean, torch.where(std == 0, torch.ones_like(std), std)


def standardize(x: ArrayLike, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (_as_f64(x, mean.device) - mean) / std


def fold_standardization(weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                         std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W, b acting on (z - mean) / std  ->  W' = W / std, b' = b - W' mean acting on raw z."""
    folded = weight / std
    return folded, bias - folded @ mean


def _accuracy(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    return float(((x @ weight.T + bias).argmax(-1) == y).double().mean())


def choose_l2(
    x_train: ArrayLike,
    y_train: ArrayLike,
    x_val: ArrayLike,
    y_val: ArrayLike,
    num_classes: int,
    l2_grid: Sequence[float],
    **fit_kwargs,
) -> L2Choice:
    """Fit every l2 of the grid on standardised training rows, keep the best validation accuracy.

    The grid is fitted from the largest l2 to the smallest, each fit warm-started from the one
    before (the convex optimum does not depend on the start; only the iteration count does).
    Ties go to the larger l2. The chosen W, b are returned folded onto raw pooled features, in
    float64 (cast when loading them into a float32 head). `fit_kwargs` go to fit_logistic_lbfgs.
    """
    if not l2_grid:
        raise ValueError("choose_l2: l2_grid is empty; expected at least one l2 >= 0")
    mean, std = standardize_fit(x_train)
    xs_train, xs_val = standardize(x_train, mean, std), standardize(x_val, mean, std)
    y_val = torch.as_tensor(y_val, device=xs_val.device).long()
    grid = tuple(sorted((float(v) for v in l2_grid), reverse=True))

    accuracies, infos, best, start = [], [], None, None
    for l2 in grid:
        weight, bias, info = fit_logistic_lbfgs(xs_train, y_train, num_classes, l2, init=start, **fit_kwargs)
        start = (weight, bias)
        accuracies.append(_accuracy(xs_val, y_val, weight, bias))
        infos.append(info)
        logger.debug("l2=%.3g: val accuracy %.4f, %d L-BFGS iterations, |grad|_max %.1e (%s)",
                     l2, accuracies[-1], info.iterations, info.grad_max, info.stop)
        if best is None or accuracies[-1] > best[0]:
            best = (accuracies[-1], l2, weight, bias)

    _, l2, weight, bias = best
    weight, bias = fold_standardization(weight, bias, mean, std)
    return L2Choice(l2=l2, weight=weight, bias=bias, l2_grid=grid,
                    val_accuracies=tuple(accuracies), infos=tuple(infos))
