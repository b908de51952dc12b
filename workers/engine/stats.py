"""Confidence intervals: a seeded percentile bootstrap of the mean over images.

Every score the service reports is a mean over images with a 95% interval and n (DOMAIN.md,
section 5). The bootstrap resamples images with replacement (Efron & Tibshirani 1993, ch. 13,
percentile interval); its generator is seeded from the audit seed and the score's key, so the
same run gives the same interval bit for bit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

N_BOOTSTRAP = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """Mean of the finite per-image values with a bootstrap interval; None where undefined."""

    mean: float | None
    ci_low: float | None
    ci_high: float | None
    n: int
    n_undefined: int


def key_seed(seed: int, *key: str) -> int:
    digest = hashlib.sha256("/".join((str(seed), *key)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def bootstrap_mean(
    values: np.ndarray,
    seed: int,
    *,
    n_resamples: int = N_BOOTSTRAP,
    confidence: float = CONFIDENCE,
) -> Estimate:
    """Percentile bootstrap interval of the mean; NaNs (undefined scores) are left out and
    counted. With one value the interval is that value; with none everything is None."""
    values = np.asarray(values, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    n = int(finite.size)
    undefined = int(values.size - n)
    if n == 0:
        return Estimate(None, None, None, 0, undefined)
    mean = float(finite.mean())
    if n == 1:
        return Estimate(mean, mean, mean, 1, undefined)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    means = finite[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return Estimate(mean, float(low), float(high), n, undefined)
