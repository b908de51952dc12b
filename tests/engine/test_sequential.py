"""The adaptive audit's confidence sequence (workers/engine/sequential.py): its bounds on cases
worked out by hand, and its coverage under optional stopping, simulated on score
distributions shaped like the calibration models' exactly as an adaptive audit stops (rounds of
32 images, the shipped rule decides each look, the first decided look ends it).

The larger simulation is examples/calibration/sequential_coverage.py; its output is
docs/calibration/sequential_coverage.md."""

from __future__ import annotations

import math

import numpy as np
import pytest

from examples.calibration import sequential_coverage as coverage
from saliency_audit.workers.engine.policy import SIMILARITY_BOUNDS, Rule, evidence
from saliency_audit.workers.engine.result import Score
from saliency_audit.workers.engine.sequential import (
    confidence_path,
    confidence_sequence,
    predictable_bets,
    round_looks,
)

AUDITS = 300  # simulated audits per population (the script runs 4000)


def test_values_at_the_top_of_the_range_give_the_lower_bound_solved_by_hand() -> None:
    # n values of 1 in [0, 1]: every bet is truncated at c / m = 1 / (2m) near the bound, so
    # K+(m) = ((1 + m) / (2m))^n and the bound solves K+(L) = 2 / alpha = 40:
    # L = 1 / (2 * 40^(1/n) - 1). Nothing bets against the top: the upper bound is 1.
    for n in (5, 20, 64):
        lows, highs = confidence_path(np.ones(n), (0.0, 1.0), [n])
        assert lows[0] == pytest.approx(1 / (2 * 40 ** (1 / n) - 1), abs=1e-9)
        assert highs[0] == 1.0
    # the same values in [-1, 1] units: the bound maps linearly
    lows, highs = confidence_path(np.ones(20), SIMILARITY_BOUNDS, [20])
    assert lows[0] == pytest.approx(-1 + 2 / (2 * 40 ** (1 / 20) - 1), abs=1e-9)
    assert highs[0] == 1.0


def test_one_value_cannot_exclude_anything() -> None:
    # the first bet is sqrt(2 log 40 / (1/4 * 1 * log 2)) = 6.52: the most one value can win
    # is 1 + 6.52 < 40, so the interval is the whole range
    bets = predictable_bets(np.array([1.0]), 0.05)
    assert bets[0] == pytest.approx(math.sqrt(2 * math.log(40) / (0.25 * math.log(2))))
    assert 1 + bets[0] < 40
    lows, highs = confidence_path(np.array([0.3]), SIMILARITY_BOUNDS, [1])
    assert (lows[0], highs[0]) == (-1.0, 1.0)


def test_bets_are_predictable_and_intervals_only_shrink() -> None:
    x = np.random.default_rng(0).uniform(0, 1, 50)
    changed = x.copy()
    changed[30] = 1 - x[30]
    # the bet on value t uses values before it only
    np.testing.assert_array_equal(
        predictable_bets(x, 0.05)[:31], predictable_bets(changed, 0.05)[:31]
    )
    lows, highs = confidence_path(x, (0.0, 1.0), [10, 20, 30, 40, 50])
    assert np.all(np.diff(lows) >= 0) and np.all(np.diff(highs) <= 0)
    assert np.all(lows <= x.mean()) and np.all(highs >= x.mean())


def test_values_outside_the_bounds_are_refused_and_undefined_ones_skipped() -> None:
    with pytest.raises(ValueError, match="leave the bounds"):
        confidence_path(np.array([0.5, 1.2]), SIMILARITY_BOUNDS, [2])
    x = np.random.default_rng(1).uniform(-0.5, 0.5, 40)
    with_gaps = np.insert(x, [5, 17], np.nan)  # two images without a value
    a = confidence_sequence(with_gaps, SIMILARITY_BOUNDS, [21, 42])
    b = confidence_path(x, SIMILARITY_BOUNDS, [19, 40])
    assert a is not None and (a.low, a.high, a.n) == (b[0][-1], b[1][-1], 40)
    assert confidence_sequence(np.array([np.nan]), SIMILARITY_BOUNDS, [1]) is None


def test_an_adaptive_verdict_rests_on_the_same_sequence_the_simulation_runs() -> None:
    # evidence(looks=...) is what an adaptive audit decides on: the confidence path of the
    # per-image values over the audit's looks
    values = np.random.default_rng(2).uniform(-0.2, 0.9, 96)
    score = Score("m", "cascading", "s1", 1, "ssim", float(values.mean()), None, None, 96, 0,
                  tuple(values))  # fmt: skip
    rule = Rule("ssim", "last", 0.462, "below", fail_threshold=0.473)
    looks = round_looks(96, 32)
    ev = evidence([score], rule, 0, looks=looks)
    lows, highs = confidence_path(values, SIMILARITY_BOUNDS, looks)
    assert ev is not None and ev.interval == "sequence"
    assert (ev.ci_low, ev.ci_high, ev.n) == (lows[-1], highs[-1], 96)
    assert ev.mean == pytest.approx(values.mean())


@pytest.fixture(scope="module")
def populations() -> list[coverage.Population]:
    return coverage.populations(coverage.cascading_rule())


def test_adaptive_intervals_keep_95_percent_coverage_and_verdicts_under_optional_stopping(
    populations: list[coverage.Population],
) -> None:
    rule = coverage.cascading_rule()
    missed = wrong = audits = 0
    for i, pop in enumerate(populations):
        out = coverage.simulate(pop, rule, images=256, round_images=32, audits=AUDITS, seed=i)
        # at most 5% of the audits, up to the binomial margin (p = 0.001) of AUDITS draws
        assert out.missed <= out.allowed(), (pop.name, out)
        assert out.wrong <= out.allowed(), (pop.name, out)
        missed, wrong, audits = missed + out.missed, wrong + out.wrong, audits + out.audits
    assert missed / audits <= 0.05 and wrong / audits <= 0.05
    # the populations include the hard cases: means on a threshold, and clear ones decided early
    on_threshold = [p for p in populations if abs(p.mean - rule.threshold) < 1e-9]
    assert len(on_threshold) >= 2
    (backprop,) = [p for p in populations if p.name == "shapes64_mobilenet_v2 guided_backprop"]
    clear = coverage.simulate(backprop, rule, images=256, round_images=32, audits=AUDITS, seed=0)
    assert clear.decided == AUDITS and clear.mean_images == 32


def test_a_fixed_n_interval_recomputed_at_every_round_fails_the_same_check(
    populations: list[coverage.Population],
) -> None:
    # what the check above guards against: peeking at the bootstrap-like interval after every
    # round gives wrong verdicts far beyond 5% when the mean sits on a threshold
    rule = coverage.cascading_rule()
    worst = max(
        coverage.simulate(
            pop, rule, images=256, round_images=32, audits=AUDITS, seed=i, interval="fixed"
        ).wrong
        for i, pop in enumerate(populations)
        if "mean moved" in pop.name or "two points" in pop.name
    )
    assert worst > coverage.Outcome(AUDITS, 0, 0, 0, 0).allowed()
