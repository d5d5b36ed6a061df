"""Win rates and bootstrap intervals on paired per-image scores (pure numpy).

A pair (a[i], b[i]) is model A's and model B's score for the same prompt and seed. A wins
when a[i] > b[i]; a tie counts half a win. Intervals are percentile bootstrap intervals:
`n_resamples` draws of the n indices with replacement from `numpy.random.default_rng(seed)`
(`rng.integers(0, n, size=(n_resamples, n))`), the statistic on each draw, and the
(1 - confidence) / 2 and (1 + confidence) / 2 quantiles of those values (numpy's default
linear interpolation). With `groups` (e.g. the prompt index of each image when there are
several seeds per prompt) whole groups are resampled instead of single images.
"""

from __future__ import annotations

import numpy as np

_CHUNK = 1_000_000  # index draws per chunk: bounds memory for large n * n_resamples


def _as_array(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds NaN or infinite values")
    return arr


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_array(a, "a"), _as_array(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same length, got {a.size} and {b.size}")
    return a, b


def win_values(a, b) -> np.ndarray:
    """Per-pair wins of A over B: 1 where a > b, 0.5 on ties, 0 where a < b."""
    a, b = _paired(a, b)
    return (a > b) + 0.5 * (a == b)


def win_rate(a, b) -> float:
    """Share of pairs where A's score beats B's (ties count half)."""
    return float(win_values(a, b).mean())


def _bootstrap(values: np.ndarray, *, n_resamples: int, confidence: float, seed: int,
               groups=None) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampling groups when given)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if groups is not None:
        groups = np.asarray(groups).reshape(-1)
        if groups.shape != values.shape:
            raise ValueError(f"groups must have one entry per pair, got {groups.size} for {values.size}")
        _, inverse = np.unique(groups, return_inverse=True)
        sums = np.bincount(inverse, weights=values)
        counts = np.bincount(inverse).astype(np.float64)
    else:
        sums, counts = values, np.ones_like(values)
    n = sums.size
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)
    # an even number of rows per chunk keeps the draws equal to one rng.integers(..., (n_resamples, n))
    # call: numpy fills 32-bit bounded draws in pairs and drops an odd leftover at the end of a call
    rows = max(2, (_CHUNK // n) // 2 * 2)
    for start in range(0, n_resamples, rows):
        k = min(rows, n_resamples - start)
        idx = rng.integers(0, n, size=(k, n))
        stats[start:start + k] = sums[idx].sum(1) / counts[idx].sum(1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(low), float(high)


def paired_bootstrap_ci(a, b, *, n_resamples: int = 10000, confidence: float = 0.95, seed: int = 0,
                        groups=None) -> tuple[float, float]:
    """Percentile bootstrap interval of `win_rate(a, b)`, resampling pairs (or `groups`) with
    replacement."""
    return _bootstrap(win_values(a, b), n_resamples=n_resamples, confidence=confidence, seed=seed,
                      groups=groups)


def mean_ci(x, *, n_resamples: int = 10000, confidence: float = 0.95, seed: int = 0,
            groups=None) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `x` and its percentile bootstrap interval."""
    x = _as_array(x, "x")
    low, high = _bootstrap(x, n_resamples=n_resamples, confidence=confidence, seed=seed, groups=groups)
    return float(x.mean()), low, high
