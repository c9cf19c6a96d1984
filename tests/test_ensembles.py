"""Calibrated ensembles, each checked against an oracle that shares no code with pipeline.training.ensembles:
a dense float64 grid search of the NLL, hand-computed greedy selections, plain numpy averages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.training.ensembles import (
    calibrated_ensembles,
    calibrated_probs,
    ensemble_probs,
    fit_temperatures,
    greedy_selection,
)


def member_logits(seed: int, n: int = 240, classes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Logits of five members with different calibration, float32 values held in float64, and labels.
    0: over-confident (T > 1), 1: under-confident (T < 1), 2: separable (T at the lower bound),
    3: unrelated to the labels (large T), 4: mildly informative."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    onehot = np.eye(classes)[y]
    noise = rng.standard_normal((5, n, classes))
    logits = np.stack([
        8.0 * (onehot + 1.2 * noise[0]),
        0.2 * (onehot + 0.6 * noise[1]),
        3.0 * onehot + 0.1 * noise[2],
        noise[3],
        onehot + noise[4],
    ])
    return logits.astype(np.float32).astype(np.float64), y


def grid_nll(z: np.ndarray, y: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    """NLL of softmax(z / T) for every T: the oracle (np.logaddexp.reduce, nothing from the module)."""
    out = np.empty(len(temperatures))
    picked = z[np.arange(len(y)), y]
    for i, t in enumerate(temperatures):
        out[i] = np.mean(np.logaddexp.reduce(z / t, axis=-1) - picked / t)
    return out


def binary(p0: list[float]) -> np.ndarray:
    """Per-sample probabilities [p, 1 - p] of a two-class member (dyadic values: every sum is exact)."""
    p = np.asarray(p0, dtype=np.float64)
    return np.stack([p, 1.0 - p], axis=-1)


def acc_of_mean(probs: np.ndarray, sequence: list[int], y: np.ndarray) -> float:
    return float(np.mean(probs[sequence].mean(0).argmax(-1) == y))


@pytest.mark.parametrize("seed", [0, 1])
def test_temperatures_match_a_dense_grid_search(seed):
    z, y = member_logits(seed)
    fitted = fit_temperatures(z, y)
    log_grid = np.linspace(np.log(0.01), np.log(100.0), 20001)
    step = log_grid[1] - log_grid[0]
    for m in range(z.shape[0]):
        nll = grid_nll(z[m], y, np.exp(log_grid))
        best = int(np.argmin(nll))
        assert grid_nll(z[m], y, fitted[m:m + 1])[0] <= nll[best] + 1e-12, f"member {m}"
        assert abs(np.log(fitted[m]) - log_grid[best]) <= step, f"member {m}: T {fitted[m]} vs grid {np.exp(log_grid[best])}"
    assert fitted[0] > 1 and fitted[1] < 1 and fitted[3] > 1  # the members were built that way
    assert fitted[2] == pytest.approx(0.01)  # separable: the NLL falls all the way to the bound


def test_temperatures_are_deterministic_and_accept_float32_torch():
    z, y = member_logits(2)
    from_numpy = fit_temperatures(z, y)
    assert np.array_equal(from_numpy, fit_temperatures(z, y))
    assert np.array_equal(from_numpy, fit_temperatures(torch.from_numpy(z.astype(np.float32)), torch.from_numpy(y)))


def test_calibration_keeps_every_members_argmax():
    z, y = member_logits(3)
    p = calibrated_probs(z, fit_temperatures(z, y))
    assert p.dtype == np.float64
    assert np.array_equal(p.argmax(-1), z.argmax(-1))
    assert np.allclose(p.sum(-1), 1.0, rtol=0, atol=1e-12)
    assert np.array_equal((p.argmax(-1) == y).mean(-1), (z.argmax(-1) == y).mean(-1))


def test_greedy_picks_the_best_pair_not_the_two_best_members():
    # Label 0 everywhere. By hand: A and B are right on samples 0-2 (3/4), C only on sample 3 (1/4).
    # A beats B on NLL, so round 1 takes A. A+B still misses sample 3 ((0.375 + 0.4375) / 2 < 0.5);
    # A+C gets all four ((0.875 + 0.4375) / 2 = 0.65625, (0.375 + 0.875) / 2 = 0.625).
    B = binary([0.75, 0.75, 0.75, 0.4375])
    A = binary([0.875, 0.875, 0.875, 0.375])
    C = binary([0.4375, 0.4375, 0.4375, 0.875])
    probs, y = np.stack([B, A, C]), np.zeros(4, dtype=np.int64)
    top2 = sorted(range(3), key=lambda m: -acc_of_mean(probs, [m], y))[:2]
    assert sorted(top2) == [0, 1] and acc_of_mean(probs, top2, y) == 0.75
    assert greedy_selection(probs, y, rounds=1) == [1]
    assert greedy_selection(probs, y, rounds=2) == [1, 2]
    assert acc_of_mean(probs, [1, 2], y) == 1.0


def test_greedy_repeats_a_member():
    # By hand: A and C are each right once (1/2); A has the lower NLL, so round 1 takes A.
    # Round 2: A+C is still 1/2 with a higher NLL than A+A, so A again. Round 3: A+A+C gets both:
    # (0.75 + 0.75 + 0.125) / 3 > 1/2 and (0.375 + 0.375 + 0.875) / 3 > 1/2.
    A = binary([0.75, 0.375])
    B = binary([0.25, 0.25])  # wrong everywhere, never useful
    C = binary([0.125, 0.875])
    probs, y = np.stack([A, B, C]), np.zeros(2, dtype=np.int64)
    assert greedy_selection(probs, y, rounds=2) == [0]  # A+A ties A: the shorter prefix is kept
    assert greedy_selection(probs, y, rounds=3) == [0, 0, 2]
    longer = greedy_selection(probs, y, rounds=20)
    assert longer[:3] == [0, 0, 2] and acc_of_mean(probs, longer, y) == 1.0


def test_greedy_with_one_member_is_that_member():
    z, y = member_logits(4)
    assert greedy_selection(calibrated_probs(z[:1], [1.0]), y, rounds=5) == [0]


@pytest.mark.parametrize("seed", range(4))
def test_greedy_never_below_the_best_member(seed):
    z, y = member_logits(seed, n=120)
    probs = calibrated_probs(z, fit_temperatures(z, y))
    selection = greedy_selection(probs, y, rounds=10)
    best_single = max(float(np.mean(z[m].argmax(-1) == y)) for m in range(len(z)))
    assert 1 <= len(selection) <= 10
    assert acc_of_mean(probs, selection, y) >= best_single


def test_ensemble_probs_counts_weights():
    probs = np.stack([binary([0.5, 0.25]), binary([0.75, 1.0])])
    expected = (2 * probs[0] + probs[1]) / 3
    assert np.allclose(ensemble_probs(probs, [0, 1], weights=[2, 1]), expected, rtol=0, atol=1e-15)
    assert np.array_equal(ensemble_probs(probs, [0, 1], weights=[2, 1]), ensemble_probs(probs, [0, 0, 1]))


def test_calibrated_ensembles_reports():
    z, y = member_logits(5)
    zt, yt = member_logits(6)
    out = calibrated_ensembles(z, y, zt, yt, k=3, rounds=12)
    temperatures = np.asarray(out.temperatures)
    val_p = np.exp(z / temperatures[:, None, None])  # the oracle's own softmax
    val_p /= val_p.sum(-1, keepdims=True)
    test_p = np.exp(zt / temperatures[:, None, None])
    test_p /= test_p.sum(-1, keepdims=True)

    def weighted_acc(p, report, labels):
        mix = sum(w * p[m] for m, w in zip(report.members, report.weights)) / sum(report.weights)
        return float(np.mean(mix.argmax(-1) == labels))

    raw_acc = (z.argmax(-1) == y).mean(-1)
    assert len(out.top1.members) == 1 and out.top1.weights == (1,)
    assert out.top1.val_acc == raw_acc.max()
    assert out.top1.test_acc == float(np.mean(zt[out.top1.members[0]].argmax(-1) == yt))
    assert len(out.top_k.members) == 3 and out.top_k.weights == (1, 1, 1)
    assert sorted(raw_acc[list(out.top_k.members)]) == sorted(raw_acc)[-3:]
    assert 1 <= sum(out.greedy.weights) <= 12 and len(set(out.greedy.members)) == len(out.greedy.members)
    assert out.greedy.val_acc >= out.top1.val_acc
    for report in (out.top1, out.top_k, out.greedy):
        assert report.val_acc == weighted_acc(val_p, report, y), report.method
        assert report.test_acc == weighted_acc(test_p, report, yt), report.method
    assert out.to_dict()["greedy"]["weights"] == list(out.greedy.weights)


def test_calibrated_ensembles_without_test_and_large_k():
    z, y = member_logits(7)
    out = calibrated_ensembles(torch.from_numpy(z.astype(np.float32)), torch.from_numpy(y), k=50)
    assert len(out.top_k.members) == z.shape[0]
    assert out.top1.test_acc is None and out.top_k.test_acc is None and out.greedy.test_acc is None


def test_bad_inputs_name_what_was_expected():
    z, y = member_logits(8)
    with pytest.raises(ValueError, match=r"labels: got shape \(3,\), expected \[240\]"):
        fit_temperatures(z, y[:3])
    with pytest.raises(ValueError, match="expected \\[M, n, C\\]"):
        greedy_selection(z[0], y)
    with pytest.raises(ValueError, match="rounds: got 0"):
        greedy_selection(calibrated_probs(z, np.ones(5)), y, rounds=0)
    with pytest.raises(ValueError, match="k: got 0"):
        calibrated_ensembles(z, y, k=0)
    with pytest.raises(ValueError, match="only one of them"):
        calibrated_ensembles(z, y, z, k=2)
