"""Calibrated ensembles of trained members: temperature scaling, then top-1, top-k and greedy selection.

Notation: member m has logits z_m [n, C] on a split, labels y [n].

Temperature scaling (Guo et al. 2017), one T_m > 0 per member, fitted on validation:

    p_m(c | x) = softmax(z_m(x) / T_m)_c
    T_m = argmin_{T in [0.01, 100]}  NLL_m(T),   NLL_m(T) = 1/n sum_i [ logsumexp_c(z_ic / T) - z_iy_i / T ]

NLL_m is convex in beta = 1/T (a logsumexp of functions linear in beta), with

    dNLL/dbeta   = 1/n sum_i ( E_p[z_i] - z_iy_i )         (non-decreasing in beta)
    d2NLL/dbeta2 = 1/n sum_i Var_p[z_i] >= 0

so its minimiser on the interval is the root of the first derivative, found by Newton's method
safeguarded by bisection (or the end of the interval the derivative points to). T > 0 is a
strictly increasing rescaling of the logits, so calibration leaves every member's argmax, hence
its own accuracy, unchanged.

An ensemble of members S (a multiset: a member may appear several times) predicts

    p_S = 1/|S| sum_{m in S} p_m,      yhat = argmax_c p_S(c),
    acc(S) = 1/n sum_i [yhat_i = y_i],  NLL(S) = -1/n sum_i log p_S(y_i | x_i)

and is scored on validation by acc(S), ties broken by lower NLL(S). The same order, ties then
broken by lower index, ranks single members for top-1 and top-k, and is the one ranking the
trainer reports, saves and names top-1 by (`ranked`).

A member with a non-finite validation logit (it diverged) is never ranked among the others or
selected: it comes last in `ranked`, and its temperature is reported as NaN. A sample whose
averaged probabilities are not all finite (a member finite on validation may overflow on a
test image) is counted wrong, never read by argmax as class 0. With no finite member, every
ensemble is empty, with accuracy 0.

Greedy selection with replacement (Caruana et al. 2004, "Ensemble selection from libraries of
models"): S_0 = {}, S_r = S_{r-1} + {argbest_m score(S_{r-1} + {m})} for r = 1..rounds; the
result is the prefix S_r with the best score (the shortest among equals). S_1 is the best single
member (Caruana's initialisation with the best model), so the result's validation accuracy is
never below the best member's.

All arithmetic is float64 NumPy on the CPU and deterministic. Memory: the calibrated
probabilities of a split, M * n * C * 8 bytes.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

T_MIN, T_MAX = 0.01, 100.0
_TINY = np.finfo(np.float64).tiny  # log(0) guard for the NLL of an ensemble


@dataclass(frozen=True)
class EnsembleReport:
    """One ensemble: distinct member indices, how many times each is averaged, accuracies."""

    method: str  # "top1", "top_k" or "greedy"
    members: tuple[int, ...]
    weights: tuple[int, ...]  # per member, its count in the average (all 1 except for greedy)
    val_acc: float
    test_acc: Optional[float]  # None when there is no test split

    def to_dict(self) -> dict:
        return {"method": self.method, "members": list(self.members), "weights": list(self.weights),
                "val_acc": self.val_acc, "test_acc": self.test_acc}


@dataclass(frozen=True)
class CalibratedEnsembles:
    """What the trainer and the benchmark report: per-member temperatures and three ensembles."""

    temperatures: tuple[float, ...]
    ranked: tuple[int, ...]  # every member, best first (finite members by validation score, then the rest)
    diverged: tuple[int, ...]  # the members with a non-finite validation logit, left out of every ensemble
    top1: EnsembleReport
    top_k: EnsembleReport
    greedy: EnsembleReport

    def to_dict(self) -> dict:
        return {"temperatures": list(self.temperatures), "ranked": list(self.ranked), "diverged": list(self.diverged), "top1": self.top1.to_dict(),
                "top_k": self.top_k.to_dict(), "greedy": self.greedy.to_dict()}


def fit_temperatures(val_logits, val_labels, t_min: float = T_MIN, t_max: float = T_MAX) -> np.ndarray:
    """[M, n, C] logits, [n] labels -> [M] float64 temperatures minimising each member's validation NLL."""
    z = _f64(val_logits)
    y = _labels(val_labels)
    _check(z, y, "val_logits")
    if not 0 < t_min < t_max:
        raise ValueError(f"temperature bounds: got t_min={t_min}, t_max={t_max}, expected 0 < t_min < t_max")
    return np.array([_fit_one(z[m], y, 1.0 / t_max, 1.0 / t_min) for m in range(z.shape[0])])


def calibrated_probs(logits, temperatures) -> np.ndarray:
    """softmax(logits[m] / T[m]) for every member: [M, n, C] float64."""
    z = _f64(logits)
    t = np.asarray(temperatures, dtype=np.float64)
    if z.ndim != 3 or t.shape != (z.shape[0],):
        raise ValueError(f"calibrated_probs: got logits of shape {z.shape} and temperatures of shape {t.shape}, expected [M, n, C] and [M]")
    if not np.all(t > 0):
        raise ValueError(f"temperatures: got {t.tolist()}, expected every one > 0")
    return _softmax(z / t[:, None, None])


def ensemble_probs(probs: np.ndarray, members: Sequence[int], weights: Optional[Sequence[int]] = None) -> np.ndarray:
    """The average of members' probabilities [n, C]: members[j] counted weights[j] times (1 by default).
    Summed in the order given, so a greedy selection sequence reproduces its own scores exactly."""
    sequence = [m for m, w in zip(members, weights if weights is not None else [1] * len(members)) for _ in range(w)]
    if not sequence:
        raise ValueError("ensemble_probs: got no members, expected at least one")
    total = np.zeros(probs.shape[1:], dtype=np.float64)
    for m in sequence:
        total = total + probs[m]
    return total / len(sequence)


def greedy_selection(val_probs, val_labels, rounds: int = 20) -> list[int]:
    """Forward selection with replacement on validation (module docstring): the member indices of
    the best prefix, in the order chosen, repeats included. Its first element is the best member."""
    p = _f64(val_probs)
    y = _labels(val_labels)
    _check(p, y, "val_probs")
    if rounds < 1:
        raise ValueError(f"rounds: got {rounds}, expected >= 1")
    total = np.zeros(p.shape[1:], dtype=np.float64)
    chosen: list[int] = []
    best_key, best_len = None, 0
    for r in range(1, rounds + 1):
        keys = [_score(_mean(total + p[m], r), y) + (m,) for m in range(p.shape[0])]
        key = min(keys)  # (-correct, nll, index): best accuracy, then NLL, then lower index
        m = key[2]
        chosen.append(m)
        total = total + p[m]
        if best_key is None or key[:2] < best_key:
            best_key, best_len = key[:2], r
    return chosen[:best_len]


def calibrated_ensembles(val_logits, val_labels, test_logits=None, test_labels=None, *, k: int, rounds: int = 20) -> CalibratedEnsembles:
    """Temperatures fitted on validation, then three ensembles chosen on validation and, when a test
    split is given, evaluated on it: top-1 (best member), top-k (mean of the k best members'
    calibrated probabilities; k is clipped to M) and greedy (Caruana selection, weights = counts)."""
    if k < 1:
        raise ValueError(f"k: got {k}, expected >= 1")
    if (test_logits is None) != (test_labels is None):
        raise ValueError("test_logits and test_labels: got only one of them, expected both or neither")
    z_val, y_val = _f64(val_logits), _labels(val_labels)
    _check(z_val, y_val, "val_logits")
    finite = [m for m in range(z_val.shape[0]) if np.isfinite(z_val[m]).all()]
    diverged = tuple(m for m in range(z_val.shape[0]) if m not in finite)
    test_p, y_test = None, None
    if test_logits is not None:
        z_test, y_test = _f64(test_logits), _labels(test_labels)
        _check(z_test, y_test, "test_logits")
        if z_test.shape[0] != z_val.shape[0] or z_test.shape[2] != z_val.shape[2]:
            raise ValueError(f"test_logits: got shape {z_test.shape}, expected [{z_val.shape[0]}, n, {z_val.shape[2]}] like val_logits")
    temperatures = np.full(z_val.shape[0], np.nan)
    ranked, selection = [], []
    if finite:  # indices below are into the finite members, mapped back when reported
        temperatures[finite] = fit_temperatures(z_val[finite], y_val)
        val_p = calibrated_probs(z_val[finite], temperatures[finite])
        if test_logits is not None:
            test_p = calibrated_probs(z_test[finite], temperatures[finite])
        ranked = sorted(range(len(finite)), key=lambda m: _score(val_p[m], y_val) + (m,))
        selection = greedy_selection(val_p, y_val, rounds)
    log.info("temperatures %s; greedy selection %s", np.round(temperatures, 3).tolist(), [finite[m] for m in selection])

    def report(method: str, sequence: list[int]) -> EnsembleReport:
        if not sequence:  # no finite member: an empty ensemble predicts nothing right
            return EnsembleReport(method, (), (), 0.0, 0.0 if test_logits is not None else None)
        counts = Counter(sequence)  # insertion order: first selection first
        return EnsembleReport(
            method, tuple(finite[m] for m in counts), tuple(counts.values()),
            val_acc=_accuracy(ensemble_probs(val_p, sequence), y_val),
            test_acc=_accuracy(ensemble_probs(test_p, sequence), y_test) if test_p is not None else None,
        )

    return CalibratedEnsembles(
        temperatures=tuple(float(t) for t in temperatures),
        ranked=tuple(finite[m] for m in ranked) + diverged,
        diverged=diverged,
        top1=report("top1", ranked[:1]),
        top_k=report("top_k", ranked[:k]),
        greedy=report("greedy", selection),
    )


# ---------------------------------------------------------------------------------------------

def _fit_one(z: np.ndarray, y: np.ndarray, b_lo: float, b_hi: float) -> float:
    """1/beta for the root of dNLL/dbeta in [b_lo, b_hi] (rtsafe: Newton kept inside a bracket)."""
    g_lo, _ = _derivatives(z, y, b_lo)
    g_hi, _ = _derivatives(z, y, b_hi)
    if g_lo >= 0 and g_hi <= 0:  # NLL flat: every temperature is optimal, keep the logits as they are
        return min(max(1.0, 1.0 / b_hi), 1.0 / b_lo)
    if g_lo >= 0:  # increasing everywhere: the smallest beta, the largest temperature
        return 1.0 / b_lo
    if g_hi <= 0:
        return 1.0 / b_hi
    beta = 1.0 if b_lo < 1.0 < b_hi else float(np.sqrt(b_lo * b_hi))
    for _ in range(200):
        g, h = _derivatives(z, y, beta)
        if g == 0 or (h > 0 and abs(g / h) <= 1e-14 * beta):  # Newton's next step is below rounding
            break
        if g < 0:
            b_lo = beta
        else:
            b_hi = beta
        newton = beta - g / h if h > 0 else b_hi + 1.0  # outside the bracket when undefined
        beta = newton if b_lo < newton < b_hi else 0.5 * (b_lo + b_hi)
        if b_hi - b_lo <= 1e-14 * b_hi:
            break
    return 1.0 / beta


def _derivatives(z: np.ndarray, y: np.ndarray, beta: float) -> tuple[float, float]:
    """First and second derivative of the NLL of softmax(beta * z) with respect to beta."""
    p = _softmax(beta * z)
    mean = (p * z).sum(-1)
    var = (p * (z - mean[:, None]) ** 2).sum(-1)
    return float(np.mean(mean - z[np.arange(len(y)), y])), float(np.mean(var))


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _mean(total: np.ndarray, count: int) -> np.ndarray:
    return total / count


def _correct(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per sample: predicted right, from probabilities that are all finite."""
    return (probs.argmax(-1) == y) & np.isfinite(probs).all(-1)


def _score(probs: np.ndarray, y: np.ndarray) -> tuple[int, float]:
    """A sort key, smaller is better: (-number correct, NLL)."""
    correct = int(np.count_nonzero(_correct(probs, y)))
    nll = float(-np.mean(np.log(np.maximum(probs[np.arange(len(y)), y], _TINY))))
    return -correct, nll


def _accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    return float(np.count_nonzero(_correct(probs, y))) / len(y)


def _f64(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly on a GPU
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _labels(y) -> np.ndarray:
    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    return np.asarray(y).astype(np.int64)


def _check(a: np.ndarray, y: np.ndarray, name: str) -> None:
    problems = []
    if a.ndim != 3 or a.shape[0] < 1 or a.shape[1] < 1:
        problems.append(f"{name}: got shape {a.shape}, expected [M, n, C] with M, n >= 1")
    elif y.shape != (a.shape[1],):
        problems.append(f"labels: got shape {y.shape}, expected [{a.shape[1]}] (n of {name})")
    elif y.min() < 0 or y.max() >= a.shape[2]:
        problems.append(f"labels: got values in [{y.min()}, {y.max()}], expected in [0, {a.shape[2] - 1}]")
    if problems:
        raise ValueError("; ".join(problems))
