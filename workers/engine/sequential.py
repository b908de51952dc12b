"""Anytime-valid confidence sequences for the mean of per-image statistics: the intervals of an
adaptive audit, which adds images in rounds and stops as soon as every verdict is decided.

A fixed-n interval (the bootstrap of :mod:`.stats`) is valid for one look at a sample size
chosen in advance. Looking after every round and stopping at the first decision turns its 5%
error into much more (tests/engine/test_sequential.py measures it). A *confidence sequence*
(C_1, C_2, ...) covers the mean at every sample size at once, P(for all t: mu in C_t) >= 95%, so
the interval at any data-dependent stopping time is a valid 95% interval.

Method: the hedged capital process of Waudby-Smith & Ramdas (2024), "Estimating means of
bounded random variables by betting", JRSS-B 86(1), section 4 (Theorem 3) with their predictable
plug-in bets (section 5.1). For values x_i in [0, 1] and a candidate mean m, a gambler bets
lambda_i (x_i - m) each round; the wealths

    K+_t(m) = prod_{i<=t} (1 + min(lambda_i, c / m) (x_i - m))
    K-_t(m) = prod_{i<=t} (1 - min(lambda_i, c / (1 - m)) (x_i - m))

are nonnegative martingales when m is the true conditional mean of every x_i, so by Ville's
inequality each exceeds 2 / alpha at any time with probability at most alpha / 2. The lower
bound at time t is the smallest m with K+_t(m) < 2 / alpha, the upper bound the largest with
K-_t(m) < 2 / alpha (two one-sided sequences at alpha / 2 each: the paper's hedged process with
theta = 1/2 taken as a maximum). Each wealth is monotone in m (K+ nonincreasing, K-
nondecreasing), so both bounds are found by bisection, exactly up to 2^-32 of the range and
rounded outwards. The bets are predictable (they use x_1..x_{i-1} only):

    lambda_i = sqrt(2 log(2 / alpha) / (sigma2_{i-1} i log(1 + i))),
    mu_i = (1/2 + sum_{j<=i} x_j) / (i + 1),  sigma2_i = (1/4 + sum_{j<=i} (x_j - mu_j)^2) / (i + 1)

and are truncated at c / m and c / (1 - m) with c = 1/2, which keeps every factor positive.
The choice of bets decides only how narrow the sequence is, never its validity.

Assumptions, and how an adaptive audit meets them:

* **Bounded values with known bounds.** Values are mapped from ``bounds`` onto [0, 1]. A
  similarity measure lies in [-1, 1]; scaled by the controls, (s - r) / (c - r), it lies in
  [(-1 - r) / (c - r), (1 - r) / (c - r)]
  (:func:`saliency_audit.workers.engine.policy.deciding_bounds`).
  A value outside the bounds is an error, never clipped silently.
* **The same conditional mean for every image.** The audit draws its images in a seeded random
  order (a random permutation of an i.i.d. sample is i.i.d.), so the sequence targets the same
  mean a fixed-n audit of that image population estimates. Images are independent given the
  model; the per-image statistic depends on that image alone, except through the controls'
  means (the scaling), whose sampling error is at most about 0.005 on the calibration models
  and which the sequence treats as fixed (recomputed at every look).
* **Looks at any times.** The sequence is intersected over the looks made (the running
  intersection, valid because every C_t holds simultaneously); an empty intersection can only
  happen on the 5% event and then the current look's interval is reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
# c of the truncation min(lambda, c / m): 1/2 as in the paper's experiments
BET_TRUNCATION = 0.5
# bisection steps per bound: 2^-32 of the range (5e-10 of a similarity's [-1, 1])
BISECTION_STEPS = 32
# the prior the predictable bets start from: mean 1/2, variance 1/4 (one pseudo-observation)
PRIOR_MEAN = 0.5
PRIOR_VARIANCE = 0.25


@dataclass(frozen=True)
class Interval:
    """The confidence sequence's interval at the last look, in the values' own units, with the
    number of values it rests on and their mean."""

    low: float
    high: float
    n: int
    mean: float


def predictable_bets(x: np.ndarray, alpha: float) -> np.ndarray:
    """The predictable plug-in bets lambda_1..lambda_n for values ``x`` (..., n) in [0, 1]:
    lambda_i uses x_1..x_{i-1} only (Waudby-Smith & Ramdas 2024, section 5.1)."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[-1]
    t = np.arange(1, n + 1, dtype=np.float64)
    mu = (PRIOR_MEAN + np.cumsum(x, axis=-1)) / (t + 1)
    sigma2 = (PRIOR_VARIANCE + np.cumsum((x - mu) ** 2, axis=-1)) / (t + 1)
    previous = np.concatenate(
        [np.full((*x.shape[:-1], 1), PRIOR_VARIANCE), sigma2[..., :-1]], axis=-1
    )
    return np.sqrt(2.0 * math.log(2.0 / alpha) / (previous * t * np.log1p(t)))


def _log_wealth(x: np.ndarray, bets: np.ndarray, m: np.ndarray) -> np.ndarray:
    """log K+_n(m) for values (..., n), bets (..., n) and candidate means m (...,) in (0, 1)."""
    m = m[..., None]
    bet = np.minimum(bets, BET_TRUNCATION / m)
    return np.log1p(bet * (x - m)).sum(axis=-1)


def _lower_bound(x: np.ndarray, bets: np.ndarray, alpha_side: float) -> np.ndarray:
    """The smallest m in [0, 1] whose wealth K+(m) stays below 1 / alpha_side, rounded down:
    (...,) for values (..., n) in [0, 1]. K+ is nonincreasing in m and K+(1) <= 1."""
    level = math.log(1.0 / alpha_side)
    shape = x.shape[:-1]
    # at m -> 0 the truncation c / m does not bind: the wealth is prod (1 + lambda x)
    at_zero = np.log1p(bets * x).sum(axis=-1)
    lo = np.zeros(shape)  # rejected (or 0)
    hi = np.ones(shape)  # never rejected
    undecided = at_zero >= level
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        rejected = _log_wealth(x, bets, np.where(undecided, mid, 0.5)) >= level
        lo = np.where(undecided & rejected, mid, lo)
        hi = np.where(undecided & ~rejected, mid, hi)
    return lo  # every m below lo is rejected: lo is a lower bound of the non-rejected set


def unit_bounds(x: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The two-sided 1 - alpha interval of the mean of values ``x`` (..., n) in [0, 1] after
    all n of them (not intersected over earlier times)."""
    bets = predictable_bets(x, alpha)
    low = _lower_bound(x, bets, alpha / 2)
    # the upper side is the lower side of 1 - x: the bets depend on the spread only
    high = 1.0 - _lower_bound(1.0 - x, bets, alpha / 2)
    return low, high


def to_unit(values: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    """Values mapped from ``bounds`` onto [0, 1]; a value outside the bounds is an error."""
    lo, hi = bounds
    if not hi > lo:
        raise ValueError(f"bounds must be increasing, got {bounds}")
    values = np.asarray(values, dtype=np.float64)
    slack = 1e-9 * (hi - lo)
    if values.size and (values.min() < lo - slack or values.max() > hi + slack):
        raise ValueError(
            f"values in [{values.min():.6g}, {values.max():.6g}] leave the bounds {bounds}"
        )
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def confidence_path(
    values: np.ndarray,
    bounds: tuple[float, float],
    looks: Sequence[int],
    *,
    confidence: float = CONFIDENCE,
) -> tuple[np.ndarray, np.ndarray]:
    """The confidence sequence at each look: ``values`` (..., n) in the order they arrived,
    ``looks`` the increasing numbers of values seen at each look (each <= n). Returns (lows,
    highs), each (..., len(looks)), in the values' units, intersected over the looks so far.
    Vectorized over the leading axes (the simulation of tests/engine/test_sequential.py runs
    thousands of audits at once through this same function)."""
    lo, hi = bounds
    x = to_unit(values, bounds)
    lows, highs = [], []
    best_low = np.zeros(x.shape[:-1])
    best_high = np.ones(x.shape[:-1])
    for n in looks:
        if not 0 < n <= x.shape[-1]:
            raise ValueError(f"a look at {n} values, with {x.shape[-1]} values")
        low, high = unit_bounds(x[..., :n], 1.0 - confidence)
        new_low, new_high = np.maximum(best_low, low), np.minimum(best_high, high)
        empty = new_low > new_high  # only on the alpha event: report this look's interval
        best_low = np.where(empty, low, new_low)
        best_high = np.where(empty, high, new_high)
        # written from the nearer end, so a bound at an end of the range is that end exactly
        lows.append(lo + (hi - lo) * best_low)
        highs.append(hi - (hi - lo) * (1.0 - best_high))
    return np.stack(lows, axis=-1), np.stack(highs, axis=-1)


def confidence_sequence(
    values: np.ndarray,
    bounds: tuple[float, float],
    looks: Sequence[int],
    *,
    confidence: float = CONFIDENCE,
) -> Interval | None:
    """The interval after the last look for one sequence of per-image values (NaN: undefined
    for that image, left out). ``looks`` count images processed, undefined ones included; None
    when no value is defined."""
    values = np.asarray(values, dtype=np.float64).ravel()
    defined = np.isfinite(values)
    finite = values[defined]
    if finite.size == 0:
        return None
    seen = np.cumsum(defined)
    counts = sorted({int(seen[min(n, values.size) - 1]) for n in looks} - {0})
    if not counts or counts[-1] != finite.size:
        counts.append(int(finite.size))
    lows, highs = confidence_path(finite, bounds, counts, confidence=confidence)
    return Interval(float(lows[-1]), float(highs[-1]), int(finite.size), float(finite.mean()))


def round_looks(n_images: int, round_images: int) -> list[int]:
    """The looks of an adaptive audit over ``n_images``: after every ``round_images`` images and
    after the last image."""
    looks = list(range(round_images, n_images, round_images))
    return [*looks, n_images] if n_images > 0 else []
