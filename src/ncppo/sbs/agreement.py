"""Inter-annotator agreement on nominal labels: Krippendorff's alpha (any number of annotators per
item, missing votes allowed) and the observed share of agreeing pairs.

Alpha follows Krippendorff (2011), "Computing Krippendorff's alpha-reliability": the coincidence
matrix o[c, k] sums, over items with m >= 2 values, the ordered pairs of values from different
annotators weighted 1 / (m - 1); with n_c its row sums and n their total,
alpha = 1 - (n - 1) * sum_{c != k} o[c, k] / sum_{c != k} n_c n_k.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np


def coincidences(units: Sequence[Sequence[Hashable]]) -> tuple[np.ndarray, list]:
    """(o, categories): the coincidence matrix over the pairable items (two or more values)."""
    categories = sorted({v for unit in units for v in unit}, key=str)
    index = {c: i for i, c in enumerate(categories)}
    o = np.zeros((len(categories), len(categories)))
    for unit in units:
        m = len(unit)
        if m < 2:
            continue
        counts = np.bincount([index[v] for v in unit], minlength=len(categories)).astype(np.float64)
        o += (np.outer(counts, counts) - np.diag(counts)) / (m - 1)
    return o, categories


def krippendorff_alpha(units: Sequence[Sequence[Hashable]]) -> float | None:
    """Krippendorff's alpha for nominal labels; `units` holds the labels given to each item.

    None when it is undefined: fewer than two pairable values, or a single category used throughout
    (no expected disagreement)."""
    o, _ = coincidences(units)
    n_c = o.sum(1)
    n = n_c.sum()
    expected = n * n - (n_c ** 2).sum()
    if n < 2 or expected <= 0:
        return None
    observed = o.sum() - np.trace(o)
    return float(1.0 - (n - 1) * observed / expected)


def pairwise_agreement(units: Sequence[Sequence[Hashable]]) -> float | None:
    """Share of agreeing ordered pairs of values within items (each item weighted by its values, as
    in alpha); None without pairable items."""
    o, _ = coincidences(units)
    n = o.sum()
    return float(np.trace(o) / n) if n > 0 else None
