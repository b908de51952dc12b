"""Bootstrap intervals: seeded, NaN-aware, and in line with SciPy's percentile bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from saliency_audit.workers.engine.stats import bootstrap_mean, key_seed


def test_interval_is_reproducible_and_matches_scipy_percentile_bootstrap() -> None:
    values = np.random.default_rng(3).normal(0.4, 0.2, size=40)
    first = bootstrap_mean(values, seed=key_seed(0, "gradient", "cascading"))
    again = bootstrap_mean(values, seed=key_seed(0, "gradient", "cascading"))
    assert first == again
    assert first.mean == pytest.approx(values.mean()) and first.n == 40
    reference = scipy_stats.bootstrap(
        (values,), np.mean, n_resamples=20000, method="percentile", rng=np.random.default_rng(1)
    ).confidence_interval
    assert first.ci_low == pytest.approx(reference.low, abs=0.01)
    assert first.ci_high == pytest.approx(reference.high, abs=0.01)
    assert first.ci_low < first.mean < first.ci_high


def test_undefined_values_are_left_out_and_counted() -> None:
    est = bootstrap_mean(np.array([0.5, np.nan, 0.5, 0.5]), seed=0)
    assert (est.mean, est.ci_low, est.ci_high, est.n, est.n_undefined) == (0.5, 0.5, 0.5, 3, 1)
    empty = bootstrap_mean(np.array([np.nan]), seed=0)
    assert empty.mean is None and empty.n == 0 and empty.n_undefined == 1
    single = bootstrap_mean(np.array([0.7]), seed=0)
    assert single.ci_low == single.ci_high == 0.7
