"""Win rates and two-stage bootstrap intervals: hand-computed values, the resampling scheme's
variance, the small-sample widening, and coverage of a known win rate by simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ncppo.evaluate.stats import (
    _Design,
    mean_ci,
    paired_bootstrap_ci,
    t_quantile,
    two_stage_bootstrap,
    win_rate,
    win_rate_interval,
    win_values,
)

Z975 = 1.959963984540054


def test_win_rate_counts_ties_half():
    a = [3.0, 1.0, 2.0, 2.0]
    b = [1.0, 2.0, 2.0, 0.0]
    # win, loss, tie, win -> (1 + 0 + 0.5 + 1) / 4
    assert win_rate(a, b) == 0.625
    assert win_rate(b, a) == 0.375
    assert win_rate(torch.tensor(a), torch.tensor(b)) == 0.625
    np.testing.assert_array_equal(win_values(a, b), [1.0, 0.0, 0.5, 1.0])


def test_t_quantile_matches_tables():
    # two-sided 95% critical values of Student's t (any statistics table)
    for df, value in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (10, 2.2281), (30, 2.0423), (120, 1.9799)):
        assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-4)
    assert t_quantile(0.95, 5) == pytest.approx(2.0150, abs=1e-4)
    assert t_quantile(0.025, 3) == pytest.approx(-3.1824, abs=1e-4)
    assert t_quantile(0.975, 1e7) == pytest.approx(Z975, abs=1e-9)


def test_two_stage_resampling_has_the_two_stage_variance():
    """Draw prompts with replacement, then seeds inside each drawn prompt: the variance of the
    resampled mean is (n-1)/n S_b^2/n + (m-1)/m MS_w/(n m) (Davison & Hinkley eq. 3.19 form)."""
    n, m = 5, 3
    y = np.array([1, 0, 1, 0, 1, 1, 1, 0, 0, 0, 1, 0.5, 1, 1, 0])
    groups = np.repeat(np.arange(n), m)
    w = _Design(groups, n * m).weights(np.random.default_rng(0), 40000)
    assert np.all(w.sum(1) == n * m)
    # a drawn prompt contributes exactly m draws of its own seeds
    per_prompt = w.reshape(-1, n, m).sum(2)
    assert np.all(per_prompt % m == 0)
    means = w @ y / (n * m)
    g = y.reshape(n, m)
    expected = (n - 1) / n * g.mean(1).var(ddof=1) / n + (m - 1) / m * g.var(1, ddof=1).mean() / (n * m)
    assert means.mean() == pytest.approx(y.mean(), abs=3e-3)
    assert means.var() == pytest.approx(expected, rel=0.03)
    # prompts alone would give only the first term: the seeds inside them add the second
    assert expected > 4 * (n - 1) / n * g.mean(1).var(ddof=1) / n


def test_small_sample_widening_by_hand():
    """The default interval is the percentile interval widened about the estimate by
    t_df / z * sqrt(n / (n - 1)), df the Satterthwaite df of the between and within terms."""
    y = np.array([1, 1, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0, 1, 1, 0, 1], dtype=float)
    n, m = 4, 4
    groups = np.repeat(np.arange(n), m)
    raw = two_stage_bootstrap(y, groups, n_resamples=4000, seed=3, small_sample=False)
    wide = two_stage_bootstrap(y, groups, n_resamples=4000, seed=3)
    g = y.reshape(n, m)
    between = ((g.mean(1) - y.mean()) ** 2).sum() / n ** 2
    within = ((g - g.mean(1, keepdims=True)) ** 2).sum() / (n * m) ** 2
    df = (between + within) ** 2 / (between ** 2 / (n - 1) + within ** 2 / (n * (m - 1)))
    k = t_quantile(0.975, float(f"{df:.3g}")) / Z975 * math.sqrt(n / (n - 1))
    assert wide == pytest.approx((y.mean() + k * (raw[0] - y.mean()), y.mean() + k * (raw[1] - y.mean())), abs=1e-12)
    assert 1.2 < k < 2.0


def test_issue_example_four_prompts_four_seeds():
    """9 wins of 16 over 4 prompts x 4 seeds: resampling the 4 prompts alone said [50.0%, 68.8%]."""
    wins = np.array([1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=float)
    groups = np.repeat(np.arange(4), 4)
    low, high = win_rate_interval(wins, groups)
    assert low < 0.30 and high > 0.80  # 16 coin flips alone span about [31%, 81%]
    assert low <= 9 / 16 <= high


def test_all_wins_get_a_wilson_floor_not_a_point():
    wins = np.ones(16)
    groups = np.repeat(np.arange(4), 4)
    low, high = win_rate_interval(wins, groups)
    t = t_quantile(0.975, 3.0)  # no spread: df falls back to prompts - 1
    assert high == 1.0 and low == pytest.approx(16 / (16 + t * t), abs=1e-12)
    assert paired_bootstrap_ci([1, 2, 3], [1, 2, 3], n_resamples=200) == (0.5, 0.5)  # all ties: no doubt
    assert paired_bootstrap_ci([1.0, 0.0], [0.0, 1.0]) == (0.0, 1.0)
    low1, high1 = paired_bootstrap_ci([2.0], [1.0], n_resamples=50)  # one pair says little
    assert high1 == 1.0 and low1 == pytest.approx(1 / (1 + Z975 ** 2), abs=1e-9)


def _simulate(n_prompts, seeds, p, tau, *, datasets=2000, resamples=1000, seed=0, train_seeds=1, tau_seed=0.0):
    """Coverage of the 95% interval of a known population win rate: prompt (and training-seed)
    effects on the logit scale, Bernoulli wins within; one call computes every data set's interval."""
    rng = np.random.default_rng(seed)
    logit = math.log(p / (1 - p))
    effect = (logit + tau * rng.normal(size=(datasets, 1, n_prompts, 1))
              + tau_seed * rng.normal(size=(datasets, train_seeds, 1, 1)))
    truth = np.mean(1 / (1 + np.exp(-(logit + tau * rng.normal(size=400_000) + tau_seed * rng.normal(size=400_000)))))
    wins = (rng.random((datasets, train_seeds, n_prompts, seeds)) < 1 / (1 + np.exp(-effect))).astype(float)
    wins = wins.reshape(datasets, -1)
    prompt = np.tile(np.repeat(np.arange(n_prompts), seeds), train_seeds)
    if train_seeds > 1:
        groups = np.stack([np.repeat(np.arange(train_seeds), n_prompts * seeds), prompt], 1)
    else:
        groups = prompt if seeds > 1 else None
    low, high = win_rate_interval(wins, groups, n_resamples=resamples, seed=seed + 1)
    return float(np.mean((low <= truth) & (truth <= high)))


@pytest.mark.parametrize("n_prompts,seeds", [(4, 4), (20, 4), (500, 1)])
def test_coverage_of_a_known_win_rate(n_prompts, seeds):
    """>= 93% coverage at 4, 20 and 500 prompts, with prompts alike (tau 0) and differing (tau 1:
    per-prompt win probabilities spread over about 0.27-0.73 around 0.5)."""
    for p, tau in ((0.5, 0.0), (0.5, 1.0), (0.7, 1.0), (0.9, 0.5)):
        coverage = _simulate(n_prompts, seeds, p, tau)
        assert coverage >= 0.93, (n_prompts, seeds, p, tau, coverage)


def test_coverage_with_crossed_training_seeds_and_prompts():
    """The study's design: 5 training seeds x 6 prompts x 8 images, both factors random."""
    coverage = _simulate(6, 8, 0.6, 0.7, datasets=1000, resamples=500, train_seeds=5, tau_seed=0.7)
    assert coverage >= 0.93


def test_batched_rows_equal_single_calls():
    rng = np.random.default_rng(4)
    y = (rng.random((3, 12)) < 0.6).astype(float)
    groups = np.repeat(np.arange(4), 3)
    low, high = win_rate_interval(y, groups, n_resamples=500, seed=2)
    for i in range(3):
        assert (low[i], high[i]) == pytest.approx(win_rate_interval(y[i], groups, n_resamples=500, seed=2))


def test_mean_ci():
    assert mean_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    x = np.arange(10.0)
    m, lo, hi = mean_ci(x, n_resamples=4000, seed=1, small_sample=False)
    assert m == 4.5 and 2.5 < lo < 3.2 and 5.8 < hi < 6.5  # +- 1.96 * 2.87 / sqrt(10) = 1.78
    _, lo2, hi2 = mean_ci(x, n_resamples=4000, seed=1)
    k = t_quantile(0.975, 9.0) / Z975 * math.sqrt(10 / 9)
    assert (lo2, hi2) == pytest.approx((4.5 + k * (lo - 4.5), 4.5 + k * (hi - 4.5)), abs=1e-12)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="same length"):
        win_rate([1, 2], [1])
    with pytest.raises(ValueError, match="NaN"):
        win_rate([1, float("nan")], [1, 2])
    with pytest.raises(ValueError, match="empty"):
        paired_bootstrap_ci([], [])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap_ci([1], [2], confidence=95)
    with pytest.raises(ValueError, match="one entry"):
        two_stage_bootstrap([1.0, 2.0, 3.0], [0, 1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        win_rate_interval([0.0, 2.0])
