"""Two-stage (hierarchical) bootstrap for items nested in prompts (pure numpy).

Stage 1 draws the prompts with replacement; stage 2 draws, within each drawn prompt, as many of
its items (seeds) as it has, with replacement. The statistic of a resample is the mean over all
drawn items. The interval is the (1 - confidence)/2 and (1 + confidence)/2 quantiles of the
resampled statistics (numpy's linear interpolation), as in `ncppo.evaluate.stats`.

Kept here until `ncppo.evaluate.stats` has a shared two-stage bootstrap (issue 13); then this
module should go and `results` should call that one.
"""

from __future__ import annotations

import numpy as np

_CHUNK = 2_000_000  # member draws per chunk: bounds memory for many prompts x many resamples


def two_stage_bootstrap_stats(values, groups, *, n_resamples: int = 10000, seed: int = 0) -> np.ndarray:
    """The `n_resamples` resampled means of `values` (one per item) with items nested in `groups`."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    groups = np.asarray(groups).reshape(-1)
    if values.size == 0:
        raise ValueError("no values to resample")
    if groups.shape != values.shape:
        raise ValueError(f"groups must have one entry per value, got {groups.size} for {values.size}")
    if not np.all(np.isfinite(values)):
        raise ValueError("values hold NaN or infinite entries")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    _, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    sorted_values = values[order]
    sizes = np.bincount(inverse)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    n_groups, largest = sizes.size, int(sizes.max())
    slots = np.arange(largest)
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)
    rows = max(1, _CHUNK // (n_groups * largest))
    for start in range(0, n_resamples, rows):
        k = min(rows, n_resamples - start)
        drawn = rng.integers(0, n_groups, size=(k, n_groups))  # stage 1: prompts
        size = sizes[drawn][..., None]  # (k, G, 1)
        member = np.floor(rng.random((k, n_groups, largest)) * size).astype(np.int64)  # stage 2: items
        used = slots < size  # a prompt with fewer items than the largest fills only its first slots
        picked = np.where(used, sorted_values[starts[drawn][..., None] + np.minimum(member, size - 1)], 0.0)
        stats[start:start + k] = picked.sum((1, 2)) / size[..., 0].sum(1)
    return stats


def two_stage_bootstrap_ci(values, groups, *, n_resamples: int = 10000, confidence: float = 0.95,
                           seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of `values` under the two-stage bootstrap (groups, then items)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    stats = two_stage_bootstrap_stats(values, groups, n_resamples=n_resamples, seed=seed)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(low), float(high)
