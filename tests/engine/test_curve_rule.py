"""The curve rule: a cascade's similarity curve summarized over the fraction of modules
randomized, scaled by the controls, decided with a PASS and a FAIL threshold, and the number of
images an INCONCLUSIVE would need."""

from __future__ import annotations

import numpy as np
import pytest

from saliency_audit.workers.engine.errors import SpecError
from saliency_audit.workers.engine.policy import (
    Evidence,
    Rule,
    curve_area,
    evidence,
    images_to_decide,
    load_policy,
    stage_fractions,
)
from saliency_audit.workers.engine.result import Score, StageInfo, TestResult


def _score(method: str, stage_index: int, values: list[float], measure: str = "ssim") -> Score:
    v = np.array(values)
    return Score(
        method,
        "cascading",
        f"s{stage_index}",
        stage_index,
        measure,
        float(v.mean()),
        None,
        None,
        len(v),
        0,
        tuple(values),
    )


def test_the_curve_area_is_a_step_function_of_the_fraction_randomized() -> None:
    # stages at 20%, 60%, 100% of the modules; the first stage's value holds from 0
    stages = [(0.2, np.array([0.5])), (0.6, np.array([0.25])), (1.0, np.array([0.0]))]
    assert curve_area(stages, 0.0, 0.5)[0] == pytest.approx((0.2 * 0.5 + 0.3 * 0.25) / 0.5)
    assert curve_area(stages, 0.0, 1.0)[0] == pytest.approx(0.2 * 0.5 + 0.4 * 0.25)
    assert curve_area(stages, 0.5, 1.0)[0] == pytest.approx((0.1 * 0.25) / 0.5)


def test_a_finer_granularity_samples_the_same_curve() -> None:
    # one block of two modules vs the two modules one stage each, on a curve constant per block
    blocks = [(0.5, np.array([0.3, 0.4])), (1.0, np.array([0.1, 0.1]))]
    modules = [
        (0.25, np.array([0.3, 0.4])),
        (0.5, np.array([0.3, 0.4])),
        (0.75, np.array([0.1, 0.1])),
        (1.0, np.array([0.1, 0.1])),
    ]
    np.testing.assert_allclose(curve_area(blocks, 0, 0.5), curve_area(modules, 0, 0.5))
    np.testing.assert_allclose(curve_area(blocks, 0, 1), curve_area(modules, 0, 1))


def test_an_image_undefined_at_a_stage_is_averaged_over_the_stages_it_has() -> None:
    stages = [(0.5, np.array([np.nan, 0.2])), (1.0, np.array([0.4, np.nan]))]
    np.testing.assert_allclose(curve_area(stages, 0, 1), [0.4, 0.2])


def test_stage_fractions_count_the_modules_randomized() -> None:
    test = TestResult(
        test="cascading",
        description="",
        reference="",
        stages=[StageInfo(1, "fc", ("fc",)), StageInfo(2, "b", ("fc", "b.0", "b.1", "c"))],
    )
    assert stage_fractions(test) == {1: 0.25, 2: 1.0}


AREA_RULE = Rule(
    measure="ssim",
    stage={"area": [0, 1]},
    threshold=0.3,
    fail_threshold=0.5,
    pass_when="below",
    scale="controls",
)


def test_controls_scale_each_stage_before_the_area() -> None:
    scores = [_score("gradient", 1, [0.6, 0.6]), _score("gradient", 2, [0.6, 0.6])]
    controls = {
        name: [_score(name, k, [level, level]) for k in (1, 2)]
        for name, level in (("control_random", 0.2), ("control_sobel", 1.0))
    }
    ev = evidence(scores, AREA_RULE, 0, fractions={1: 0.5, 2: 1.0}, controls=controls)
    assert ev is not None and ev.mean == pytest.approx((0.6 - 0.2) / (1.0 - 0.2))
    assert ev.stage == "area 0-1"


def test_an_area_needs_fractions_and_scaling_needs_both_controls() -> None:
    scores = [_score("gradient", 1, [0.1, 0.2])]
    assert evidence(scores, AREA_RULE, 0, fractions=None, controls={}) is None


def test_the_images_needed_come_from_the_spread_and_the_distance_to_the_threshold() -> None:
    near_pass = Evidence("area", mean=0.2, ci_low=0.1, ci_high=0.35, n=16, sd=0.2)
    # 1.96 * 0.2 / (0.3 - 0.2) = 3.92 -> 16 images
    assert images_to_decide(near_pass, AREA_RULE) == 17  # at least one more than it has
    wide = Evidence("area", mean=0.2, ci_low=0.0, ci_high=0.45, n=4, sd=0.4)
    assert images_to_decide(wide, AREA_RULE) == 62  # (1.96 * 0.4 / 0.1) ** 2 = 61.5
    between = Evidence("area", mean=0.4, ci_low=0.35, ci_high=0.45, n=64, sd=0.2)
    assert images_to_decide(between, AREA_RULE) is None  # inside the indifference zone


def test_a_fail_threshold_on_the_pass_side_is_refused() -> None:
    document = {
        "extends": "default",
        "tests": {
            "cascading": {
                "measure": "ssim",
                "stage": {"area": [0, 0.5]},
                "threshold": 0.5,
                "fail_threshold": 0.3,
                "pass_when": "below",
            }
        },
    }
    with pytest.raises(SpecError, match="fail side"):
        load_policy(document)
    rule = document["tests"].pop("cascading")
    document["tests"]["independent"] = {**rule, "threshold": 0.3, "fail_threshold": 0.5}
    with pytest.raises(SpecError, match="summarizes a cascade"):
        load_policy(document)
