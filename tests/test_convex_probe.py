"""The convex linear probe against scikit-learn, an oracle that shares no code with it.

sklearn's LogisticRegression(C) minimises 0.5 ||W||^2 + C sum_i CE; ours minimises
mean_i CE + (l2 / 2) ||W||^2, the same problem at l2 = 1 / (C n). Both objectives are scored here
by one hand-written numpy function in float64, so "ours is at least as low" is decided by the
problem's own definition, not by either solver's report of itself.
"""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from pipeline.training.convex_probe import (
    choose_l2,
    fit_logistic_lbfgs,
    fold_standardization,
    standardize_fit,
)

N_TRAIN, N_HELD, D, K = 200, 100, 20, 4


def objective(x: np.ndarray, y: np.ndarray, weight: np.ndarray, bias: np.ndarray, l2: float) -> float:
    """mean_i CE(x_i W^T + b, y_i) + (l2 / 2) ||W||_F^2 in float64, log-sum-exp shifted by the row max."""
    logits = x @ weight.T + bias
    top = logits.max(axis=1)
    log_z = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    return float(np.mean(log_z - logits[np.arange(len(y)), y]) + 0.5 * l2 * np.sum(weight * weight))


def blobs(seed: int, n: int, dim: int, informative: int, spread: float):
    """K Gaussian blobs in the first `informative` dims, noise elsewhere, then per-feature
    scales in [0.1, 10] and offsets in [-5, 5], so standardisation and its fold matter."""
    rng = np.random.default_rng(seed)
    centers = np.zeros((K, dim))
    centers[:, :informative] = rng.normal(0.0, spread, (K, informative))
    y = rng.integers(0, K, n)
    x = centers[y] + rng.normal(0.0, 1.0, (n, dim))
    return x * rng.uniform(0.1, 10.0, dim) + rng.uniform(-5.0, 5.0, dim), y


@pytest.fixture(scope="module")
def problem():
    x, y = blobs(seed=0, n=N_TRAIN + N_HELD, dim=D, informative=D, spread=1.0)
    scaler = StandardScaler().fit(x[:N_TRAIN])
    return scaler.transform(x[:N_TRAIN]), y[:N_TRAIN], scaler.transform(x[N_TRAIN:])


@pytest.mark.parametrize("C", [0.1, 10.0])
def test_fit_matches_sklearn(problem, C):
    x, y, x_held = problem
    l2 = 1.0 / (C * N_TRAIN)
    reference = LogisticRegression(C=C, tol=1e-10, max_iter=10000).fit(x, y)
    weight, bias, info = fit_logistic_lbfgs(torch.from_numpy(x), torch.from_numpy(y), K, l2)
    weight, bias = weight.numpy(), bias.numpy()

    assert weight.shape == (K, D) and bias.shape == (K,) and weight.dtype == np.float64
    assert info.converged and info.grad_max < 1e-8
    ours, theirs = objective(x, y, weight, bias, l2), objective(x, y, reference.coef_, reference.intercept_, l2)
    assert ours <= theirs + 1e-9 * abs(theirs)
    assert info.loss == pytest.approx(ours, rel=1e-12)  # the report is F itself, penalty included
    np.testing.assert_array_equal((x_held @ weight.T + bias).argmax(1), reference.predict(x_held))


def test_fit_is_deterministic(problem):
    x, y, _ = problem
    first = fit_logistic_lbfgs(x, y, K, 1e-3)
    second = fit_logistic_lbfgs(x, y, K, 1e-3)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1]) and first[2] == second[2]


def test_fit_names_bad_labels():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got \[0, 3\]"):
        fit_logistic_lbfgs(np.zeros((4, 2)), np.array([0, 1, 2, 3]), 3, 1e-2)


def test_standardize_fit_is_standard_scaler():
    x, _ = blobs(seed=1, n=50, dim=6, informative=6, spread=1.0)
    x[:, 2] = 7.0  # a constant feature: std 0, taken as 1 (StandardScaler does the same)
    mean, std = standardize_fit(x)
    scaler = StandardScaler().fit(x)
    assert mean.dtype == std.dtype == torch.float64
    np.testing.assert_allclose(mean.numpy(), scaler.mean_, rtol=1e-12)
    np.testing.assert_allclose(std.numpy(), scaler.scale_, rtol=1e-12)
    assert std[2] == 1.0


def test_folded_weights_on_raw_features_equal_weights_on_standardised():
    """z W'^T + b' with W' = W / std, b' = b - W' mean is exactly x W^T + b, x = (z - mean) / std.

    Both sides are one real number evaluated in two float64 orders; each is within about
    D eps (|x| |W|^T + |b| + |W'| |mean|) of it: at most ~1e-13 of the logits' scale here
    (offsets up to 5 against stds down to 0.1 cost a factor ~50 of cancellation; measured 5e-16).
    1e-10 is three orders above that bound on any IEEE-754 machine, while a wrong fold is off by
    far more: ddof=1 by 7e-3, a dropped mean term by 0.3 of the logits' scale.
    """
    z, _ = blobs(seed=2, n=64, dim=D, informative=D, spread=1.0)
    z[:, 3] = -4.0  # constant: its std is taken as 1 on both sides
    rng = np.random.default_rng(3)
    weight, bias = rng.normal(size=(K, D)), rng.normal(size=K)
    mean, std = standardize_fit(z)
    folded_w, folded_b = fold_standardization(torch.from_numpy(weight), torch.from_numpy(bias), mean, std)

    raw = z @ folded_w.numpy().T + folded_b.numpy()
    standardised = StandardScaler().fit_transform(z) @ weight.T + bias
    assert np.abs(raw - standardised).max() <= 1e-10 * np.abs(standardised).max()


def sklearn_val_accuracy(x_train, y_train, x_val, y_val, l2):
    scaler = StandardScaler().fit(x_train)
    model = LogisticRegression(C=1.0 / (l2 * len(y_train)), tol=1e-10, max_iter=10000)
    model.fit(scaler.transform(x_train), y_train)
    return float((model.predict(scaler.transform(x_val)) == y_val).mean())


def test_choose_l2_picks_best_validation_accuracy():
    # 4 informative dims of 40 and 80 training rows: small l2 overfits, large l2 underfits.
    x, y = blobs(seed=0, n=280, dim=40, informative=4, spread=1.5)
    x_train, y_train, x_val, y_val = x[:80], y[:80], x[80:], y[80:]
    grid = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    choice = choose_l2(x_train, y_train, x_val, y_val, K, grid)

    assert choice.l2_grid == tuple(sorted(grid, reverse=True))
    expected = [sklearn_val_accuracy(x_train, y_train, x_val, y_val, l2) for l2 in choice.l2_grid]
    assert list(choice.val_accuracies) == expected
    assert len(set(expected)) > 1, "the grid should not be a tie, or the choice proves nothing"
    best = max(expected)
    assert choice.l2 == max(l2 for l2, acc in zip(choice.l2_grid, expected) if acc == best)
    assert all(info.converged for info in choice.infos)

    # The folded float64 head acts on raw features and reproduces the chosen accuracy.
    assert choice.weight.dtype == choice.bias.dtype == torch.float64
    predicted = (x_val @ choice.weight.numpy().T + choice.bias.numpy()).argmax(1)
    assert float((predicted == y_val).mean()) == best


def test_choose_l2_ties_go_to_the_larger_l2():
    x, y = blobs(seed=4, n=120, dim=5, informative=5, spread=20.0)  # separable: every l2 scores 1.0
    choice = choose_l2(x[:60], y[:60], x[60:], y[60:], K, [1e-3, 1e-1])
    assert choice.val_accuracies == (1.0, 1.0)
    assert choice.l2 == 1e-1
