"""The report's one statistic: a percentile-bootstrap confidence interval of the mean of paired
differences (teacher loss L minus the `ce` teacher, run for run).

Why a bootstrap of paired differences: the two runs of a pair share the seed and the
hyperparameters, so most of the run-to-run noise cancels in their difference; the bootstrap
assumes nothing about the differences' distribution (accuracy gains are bounded and often
skewed), which a t-interval would."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIN_PAIRS = 3  # below this, no interval: a bootstrap of 1 or 2 values says nothing


@dataclass(frozen=True)
class Interval:
    """Mean of `n` paired differences and its confidence interval [low, high] (NaN when
    n < MIN_PAIRS; mean NaN too when n = 0)."""

    n: int
    mean: float
    low: float
    high: float

    @property
    def has_ci(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))

    @property
    def excludes_zero(self) -> bool:
        """The interval lies wholly on one side of 0: the sign of the gain is resolved."""
        return self.has_ci and (self.low > 0 or self.high < 0)


def paired_bootstrap(
    diffs: Sequence[float], *, n_boot: int = 10000, level: float = 0.95, seed: int = 0
) -> Interval:
    """Percentile bootstrap of the mean of `diffs`: resample the n differences with replacement
    `n_boot` times, take the `(1-level)/2` and `1-(1-level)/2` percentiles of the resampled
    means. Deterministic for a given input (a numpy Generator seeded with `seed`).

    With fewer than MIN_PAIRS differences no interval is given (low = high = NaN): from two
    values the bootstrap distribution has three atoms, and its "95% interval" is just their
    range, which would read as far more certainty than two runs give. NaN differences are
    not allowed (drop the pair before)."""
    d = np.asarray(diffs, dtype=float)
    if np.isnan(d).any():
        raise ValueError("paired_bootstrap: a difference is NaN (drop incomplete pairs first)")
    if not 0 < level < 1:
        raise ValueError(f"paired_bootstrap: level must be in (0, 1), got {level}")
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    if n < MIN_PAIRS:
        return Interval(n, mean, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)  # all resamples at once
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(n, mean, float(low), float(high))
