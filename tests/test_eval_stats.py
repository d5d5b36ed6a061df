"""Win rate and bootstrap intervals against hand-computed values and an independent numpy recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ncppo.evaluate.stats import mean_ci, paired_bootstrap_ci, win_rate, win_values


def test_win_rate_counts_ties_half():
    a = [3.0, 1.0, 2.0, 2.0]
    b = [1.0, 2.0, 2.0, 0.0]
    # win, loss, tie, win -> (1 + 0 + 0.5 + 1) / 4
    assert win_rate(a, b) == 0.625
    assert win_rate(b, a) == 0.375
    assert win_rate(torch.tensor(a), torch.tensor(b)) == 0.625
    np.testing.assert_array_equal(win_values(a, b), [1.0, 0.0, 0.5, 1.0])


def test_bootstrap_degenerate_cases():
    assert paired_bootstrap_ci([1, 2, 3], [1, 2, 3], n_resamples=200) == (0.5, 0.5)  # all ties
    assert paired_bootstrap_ci([2.0], [1.0], n_resamples=50) == (1.0, 1.0)  # one pair
    # two pairs, one win one loss: resampled win rates are 0, 0.5, 1 with p = 1/4, 1/2, 1/4, so the
    # 2.5% and 97.5% quantiles are 0 and 1
    assert paired_bootstrap_ci([1.0, 0.0], [0.0, 1.0]) == (0.0, 1.0)


def test_bootstrap_equals_independent_numpy_recipe():
    rng = np.random.default_rng(123)
    n = 301  # n * 10000 draws exceed one chunk: the chunked draws must equal one big draw
    a = rng.normal(0.1, 1, n).round(1)
    b = rng.normal(0.0, 1, n).round(1)
    wins = np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))
    idx = np.random.default_rng(5).integers(0, n, size=(10000, n))
    expected = np.quantile(wins[idx].mean(1), [0.05, 0.95])
    low, high = paired_bootstrap_ci(a, b, n_resamples=10000, confidence=0.9, seed=5)
    assert (low, high) == pytest.approx(tuple(expected), abs=1e-12)
    assert low < win_rate(a, b) < high
    assert paired_bootstrap_ci(a, b, seed=6) != paired_bootstrap_ci(a, b, seed=5)


def test_grouped_bootstrap_resamples_whole_prompts():
    a = np.array([1.0, 1.0, 0.0, 5.0, 2.0, 2.0])
    b = np.array([0.0, 0.0, 1.0, 1.0, 2.0, 3.0])
    groups = np.array([0, 0, 1, 1, 2, 2])  # two seeds per prompt
    wins = np.array([1, 1, 0, 1, 0.5, 0])
    idx = np.random.default_rng(0).integers(0, 3, size=(2000, 3))
    sums, counts = np.array([2.0, 1.0, 0.5]), np.array([2.0, 2.0, 2.0])
    expected = np.quantile(sums[idx].sum(1) / counts[idx].sum(1), [0.025, 0.975])
    got = paired_bootstrap_ci(a, b, n_resamples=2000, groups=groups)
    assert got == pytest.approx(tuple(expected), abs=1e-12)
    assert win_rate(a, b) == wins.mean()


def test_mean_ci():
    assert mean_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    x = np.arange(10.0)
    m, lo, hi = mean_ci(x, n_resamples=4000, seed=1)
    idx = np.random.default_rng(1).integers(0, 10, size=(4000, 10))
    assert m == 4.5
    assert (lo, hi) == pytest.approx(tuple(np.quantile(x[idx].mean(1), [0.025, 0.975])), abs=1e-12)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="same length"):
        win_rate([1, 2], [1])
    with pytest.raises(ValueError, match="NaN"):
        win_rate([1, float("nan")], [1, 2])
    with pytest.raises(ValueError, match="empty"):
        paired_bootstrap_ci([], [])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap_ci([1], [2], confidence=95)
