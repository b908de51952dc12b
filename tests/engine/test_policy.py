"""The verdict policy: a versioned document decides PASS / FAIL / INCONCLUSIVE from the scores."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from saliency_audit.workers.engine.errors import SpecError
from saliency_audit.workers.engine.policy import decide, default_document, load_policy
from saliency_audit.workers.engine.result import Score, StageInfo, TestResult
from saliency_audit.workers.engine.spec import ANALYSES, TESTS
from saliency_audit.workers.engine.stats import bootstrap_mean, key_seed


def _score(
    method: str,
    stage: str,
    index: int,
    values: list[float],
    test: str = "cascading",
    measure: str = "spearman_abs",
) -> Score:
    est = bootstrap_mean(np.array(values), key_seed(0, method, test, stage, measure))
    return Score(
        method,
        test,
        stage,
        index,
        measure,
        est.mean,
        est.ci_low,
        est.ci_high,
        est.n,
        est.n_undefined,
        tuple(values),
    )


def _test(scores: list[Score], name: str = "cascading", **details: Any) -> TestResult:
    stages = sorted({(s.stage_index, s.stage) for s in scores})
    return TestResult(
        name,
        "",
        "",
        stages=[StageInfo(i, n) for i, n in stages],
        scores=scores,
        details=dict(details),
    )


def _policy(**rule: Any) -> dict[str, Any]:
    base = {"measure": "spearman_abs", "stage": "first", "threshold": 0.5, "pass_when": "below"}
    return {
        "format": 1,
        "name": "t",
        "version": "9",
        "tests": {"cascading": {**base, **rule}},
        "controls": {"cascading": {"control_sobel": "FAIL"}},
    }


METHODS = {
    "gradient": (False, None),
    "guided_backprop": (False, None),
    "control_sobel": (True, None),
}


def _verdicts(
    policy: dict[str, Any], test: TestResult, methods: dict[str, tuple[bool, str | None]] = METHODS
) -> dict[str, Any]:
    return {v.method: v for v in decide(load_policy(policy), {test.test: test}, methods, 0)}


def _cascade(gradient: list[float], guided: list[float], sobel: float = 1.0) -> TestResult:
    return _test(
        [
            _score("gradient", "fc", 1, gradient),
            _score("gradient", "conv", 2, [v / 2 for v in gradient]),
            _score("guided_backprop", "fc", 1, guided),
            _score("guided_backprop", "conv", 2, [v / 2 for v in guided]),
            _score("control_sobel", "fc", 1, [sobel] * 4),
            _score("control_sobel", "conv", 2, [sobel] * 4),
        ]
    )


def test_the_shipped_policy_is_valid_versioned_and_covers_every_test() -> None:
    policy = load_policy()
    assert policy.version and policy.name
    sanity_tests = [t for t in TESTS if t not in ANALYSES]  # analyses decide no verdict
    assert set(policy.rules) == set(sanity_tests)
    assert all(policy.controls[t]["control_sobel"] == "FAIL" for t in sanity_tests)
    json.dumps(policy.document)  # it travels in every report


def test_the_whole_interval_decides_and_a_straddling_interval_is_inconclusive() -> None:
    v = _verdicts(_policy(), _cascade([0.1, 0.2, 0.15, 0.12], [0.9, 0.95, 0.92, 0.91]))
    assert v["gradient"].verdict == "PASS" and v["gradient"].ci_high < 0.5
    assert v["guided_backprop"].verdict == "FAIL" and v["guided_backprop"].ci_low >= 0.5
    assert v["control_sobel"].verdict == "FAIL"
    assert v["gradient"].stage == "fc" and v["gradient"].policy_version == "9"
    assert "below the threshold 0.5" in v["gradient"].reason
    straddling = _verdicts(_policy(), _cascade([0.2, 0.8, 0.3, 0.7], [0.9, 0.9, 0.9, 0.9]))
    g = straddling["gradient"]
    assert g.verdict == "INCONCLUSIVE" and g.ci_low < 0.5 < g.ci_high
    assert "straddles" in g.reason
    # With interval "mean", the mean alone decides the same scores.
    by_mean = _verdicts(_policy(interval="mean"), _cascade([0.2, 0.8, 0.3, 0.6], [0.9] * 4))
    assert by_mean["gradient"].verdict == "PASS"


def test_stage_selectors_pick_the_stage_the_policy_names() -> None:
    test = _cascade([0.6, 0.7, 0.65, 0.62], [0.9, 0.95, 0.92, 0.91])
    assert _verdicts(_policy(stage="first"), test)["gradient"].verdict == "FAIL"
    assert _verdicts(_policy(stage="last"), test)["gradient"].verdict == "PASS"
    assert _verdicts(_policy(stage={"name": "conv"}), test)["gradient"].stage == "conv"
    assert _verdicts(_policy(stage={"index": 2}), test)["gradient"].stage == "conv"
    assert _verdicts(_policy(stage={"fraction": 0.5}), test)["gradient"].stage == "fc"
    missing = _verdicts(_policy(stage={"name": "nowhere"}), test)["gradient"]
    assert missing.verdict == "INCONCLUSIVE" and "no spearman_abs score" in missing.reason


def test_mean_over_stages_averages_each_image_over_stages_then_bootstraps() -> None:
    test = _cascade([0.6, 0.7, 0.65, 0.62], [0.9, 0.95, 0.92, 0.91])
    v = _verdicts(_policy(stage="mean_over_stages"), test)["gradient"]
    per_image = (np.array([0.6, 0.7, 0.65, 0.62]) * 1.5) / 2  # stage 2 holds half of stage 1
    assert v.mean == pytest.approx(per_image.mean())
    est = bootstrap_mean(
        per_image, key_seed(0, "gradient", "cascading", "mean_over_stages", "spearman_abs")
    )
    assert (v.ci_low, v.ci_high) == pytest.approx((est.ci_low, est.ci_high))


def test_a_control_that_disagrees_makes_every_method_inconclusive() -> None:
    # A Sobel map that changes under randomization cannot happen with a correct engine; if the
    # scores say so anyway, nothing else in the test can be trusted.
    v = _verdicts(_policy(), _cascade([0.1, 0.2, 0.15, 0.12], [0.9, 0.95, 0.92, 0.91], sobel=0.1))
    assert v["control_sobel"].verdict == "PASS"  # the control keeps its own verdict
    for method in ("gradient", "guided_backprop"):
        assert v[method].verdict == "INCONCLUSIVE"
        assert "control control_sobel got PASS where the policy expects FAIL" in v[method].reason
    assert "by the rule alone: PASS" in v["gradient"].reason


def test_data_randomization_without_memorization_is_inconclusive() -> None:
    scores = [
        _score("gradient", "random_labels", 1, [0.1, 0.1, 0.2], "data_randomization", "ssim"),
        _score("control_sobel", "random_labels", 1, [1.0] * 3, "data_randomization", "ssim"),
    ]
    policy = {"extends": "default"}
    memorized = _test(scores, "data_randomization", memorized=True)
    not_memorized = _test(
        scores,
        "data_randomization",
        memorized=False,
        memorization="train accuracy 0.31 did not reach the target 0.99",
    )
    methods = {"gradient": (False, None), "control_sobel": (True, None)}
    assert _verdicts(policy, memorized, methods)["gradient"].verdict == "PASS"
    v = _verdicts(policy, not_memorized, methods)["gradient"]
    assert v.verdict == "INCONCLUSIVE" and "did not memorize" in v.reason and "0.31" in v.reason


def test_methods_not_applicable_and_tests_not_run_are_inconclusive_with_the_reason() -> None:
    test = _cascade([0.1] * 4, [0.9] * 4)
    methods = {**METHODS, "gradcam": (False, "the model has no conv layer")}
    v = _verdicts(_policy(), test, methods)["gradcam"]
    assert v.verdict == "INCONCLUSIVE" and "no conv layer" in v.reason
    not_run = TestResult("random_logit", "", "", status="not_run", reason="a single class")
    out = decide(load_policy(), {"random_logit": not_run}, METHODS, 0)
    assert {x.verdict for x in out} == {"INCONCLUSIVE"} and "a single class" in out[0].reason


def test_eMPRT_passes_when_the_entropy_rise_is_above_the_threshold() -> None:
    rise = [
        _score(m, "full_randomization", 1, vals, "emprt", "entropy_rise")
        for m, vals in (
            ("gradient", [0.3, 0.4, 0.35]),
            ("guided_backprop", [-0.1, 0.0, 0.05]),
            ("control_sobel", [0.0, 0.0, 0.0]),
        )
    ]
    policy = {
        "extends": "default",
        "tests": {
            "emprt": {
                "measure": "entropy_rise",
                "stage": "last",
                "threshold": 0.1,
                "pass_when": "above",
            }
        },
    }
    v = _verdicts(policy, _test(rise, "emprt"))
    assert v["gradient"].verdict == "PASS"
    assert v["guided_backprop"].verdict == "FAIL" and v["control_sobel"].verdict == "FAIL"


def test_a_partial_policy_extends_the_default_entry_by_entry() -> None:
    policy = load_policy(
        {
            "extends": "default",
            "version": "mine-1",
            "tests": {
                "cascading": {
                    "measure": "ssim",
                    "stage": "last",
                    "threshold": 0.3,
                    "pass_when": "below",
                }
            },
        }
    )
    default = load_policy()
    assert policy.version == "mine-1" and policy.rules["cascading"].measure == "ssim"
    assert policy.rules["independent"] == default.rules["independent"]
    assert policy.document["extends"] == "default"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": 2}, "format"),
        ({"version": ""}, "version"),
        ({"surprise": 1}, "unknown policy fields"),
        (
            {
                "tests": {
                    "cascading": {"measure": "pearson", "threshold": 0.5, "pass_when": "below"}
                }
            },
            "measure",
        ),
        ({"tests": {"sideways": {}}}, "unknown test"),
        (
            {
                "tests": {
                    "cascading": {"measure": "ssim", "threshold": "high", "pass_when": "below"}
                }
            },
            "threshold",
        ),
        (
            {"tests": {"cascading": {"measure": "ssim", "threshold": 0.5, "pass_when": "under"}}},
            "pass_when",
        ),
        (
            {
                "tests": {
                    "cascading": {
                        "measure": "ssim",
                        "threshold": 0.5,
                        "pass_when": "below",
                        "stage": {"fraction": 2},
                    }
                }
            },
            "stage",
        ),
        (
            {
                "tests": {
                    "cascading": {"measure": "entropy_rise", "threshold": 0.5, "pass_when": "above"}
                }
            },
            "entropy_rise",
        ),
        ({"controls": {"cascading": {"control_sobel": "MAYBE"}}}, "PASS or FAIL"),
    ],
)
def test_an_invalid_policy_is_refused_with_a_message(change: dict[str, Any], message: str) -> None:
    doc = {**default_document(), **change}
    with pytest.raises(SpecError, match=message):
        load_policy(doc)
