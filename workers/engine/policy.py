"""Verdicts: PASS / FAIL / INCONCLUSIVE per (method, test), decided by a policy document.

A policy is a versioned JSON document (the shipped default is ``policies/default.json``; its
calibration is in ``docs/policy.md``). For each test it names

* ``measure``: which score decides (a similarity measure, or ``entropy_rise`` for eMPRT);
* ``stage``: which stage's score: ``"first"``, ``"last"``, ``"mean_over_stages"`` (per image,
  the mean over all stages, then the bootstrap), ``{"fraction": f}`` (stage ceil(f * n) of n),
  ``{"index": k}`` (1-based) or ``{"name": "layer4"}``;
* ``threshold`` and ``pass_when``: ``"below"`` for similarities (a method passes when its maps
  changed), ``"above"`` for eMPRT's entropy rise;
* ``interval``: ``"beyond"`` (the whole 95% interval must lie on one side of the threshold;
  an interval that straddles it is INCONCLUSIVE) or ``"mean"`` (the mean alone decides).

``map_checks`` says when a map cannot carry a verdict (:class:`MapChecks`): a (method, test)
whose maps at any stage, the trained model's included, raised, are not finite, all zero,
constant, or do not conserve relevance is INCONCLUSIVE with the reason, never scored as fine.

``controls`` names, per test, the verdict each control must get. When a control gets another
one, the test cannot tell methods apart on this model and data, and every method's verdict in
that test is INCONCLUSIVE. A data randomization whose random-label copy did not memorize its
labels is INCONCLUSIVE too.

A run may pass its own complete policy, or a partial one with ``"extends": "default"`` whose
``tests`` and ``controls`` entries replace the default's entry by entry.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import numpy as np

from .errors import SpecError
from .result import MapProblem, Score, TestResult, Verdict, VerdictValue
from .spec import MEASURES, TESTS
from .stats import bootstrap_mean, key_seed

POLICY_FORMAT = 1
DECIDING_MEASURES = (*MEASURES, "entropy_rise")
_RULE_KEYS = {"measure", "stage", "threshold", "pass_when", "interval", "why"}
_TOP_KEYS = {
    "format",
    "name",
    "version",
    "description",
    "tests",
    "controls",
    "extends",
    "map_checks",
}
_CHECK_KEYS = {
    "zero_floor",
    "constant_rtol",
    "conservation_tolerance",
    "why",
}


@dataclass(frozen=True)
class Rule:
    measure: str
    stage: str | dict[str, Any]
    threshold: float
    pass_when: Literal["below", "above"]
    interval: Literal["beyond", "mean"] = "beyond"


@dataclass(frozen=True)
class MapChecks:
    """When a map cannot carry a verdict (thresholds from the policy's ``map_checks``).

    Maps that are not finite, or whose relevance is not conserved, at any stage. And the
    trained model's maps (the reference every stage is compared with) when they are all zero
    (largest |value| at or below ``zero_floor``: the explained score changes by less than that
    per unit of normalized input, so the model does not depend on its input there, or the
    method underflowed; squared for methods whose maps scale as a squared score) or constant
    (range at or below ``constant_rtol`` times the largest |value|): compared with anything,
    such a reference says nothing, and two constant maps even look identical (SSIM 1).

    A *randomized* model's map that is all zero or constant is a legitimate outcome, not a
    problem: Grad-CAM's ReLU zeroes a map whose weighted channels all turn negative, which
    happens on 1 to 10 of 64 images per early cascade stage of the reference models. Compared
    with a healthy trained map it is a change, and it is counted in the test's details.

    ``conservation_tolerance``: a ``total`` relevance method must distribute the target logit
    within this relative tolerance on every image; a ``share`` method must hand out between
    ``-tolerance`` and ``1 + tolerance`` of its start (z+ rules keep a positive start positive
    and never add to it)."""

    zero_floor: float = 1e-12
    constant_rtol: float = 1e-6
    conservation_tolerance: float = 0.05


@dataclass(frozen=True)
class Policy:
    name: str
    version: str
    rules: dict[str, Rule]
    controls: dict[str, dict[str, VerdictValue]]
    document: dict[str, Any]
    checks: MapChecks = MapChecks()


def default_document() -> dict[str, Any]:
    text = resources.files("workers.engine").joinpath("policies/default.json").read_text()
    return dict(json.loads(text))


def load_policy(document: dict[str, Any] | None = None) -> Policy:
    """Validate a policy document (None: the shipped default) and return it parsed."""
    doc = default_document() if document is None else dict(document)
    if doc.get("extends") is not None:
        if doc["extends"] != "default":
            raise SpecError("a policy can only extend 'default'")
        base = default_document()
        doc = {
            **base,
            **{k: v for k, v in doc.items() if k not in ("tests", "controls", "extends")},
            "tests": {**base["tests"], **doc.get("tests", {})},
            "controls": {**base["controls"], **doc.get("controls", {})},
            "map_checks": {**base.get("map_checks", {}), **doc.get("map_checks", {})},
        }
        doc["extends"] = "default"
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise SpecError(f"unknown policy fields: {sorted(unknown)}")
    if doc.get("format") != POLICY_FORMAT:
        raise SpecError(f"policy format must be {POLICY_FORMAT}, got {doc.get('format')!r}")
    for key in ("name", "version"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise SpecError(f"policy needs a non-empty string {key!r}")
    tests = doc.get("tests")
    if not isinstance(tests, dict):
        raise SpecError("policy 'tests' must be an object of test name -> rule")
    rules = {name: _rule(name, raw) for name, raw in tests.items()}
    controls_doc = doc.get("controls", {})
    if not isinstance(controls_doc, dict):
        raise SpecError("policy 'controls' must be an object of test name -> {control: verdict}")
    controls: dict[str, dict[str, VerdictValue]] = {}
    for test, expected in controls_doc.items():
        if test not in TESTS or not isinstance(expected, dict):
            raise SpecError(f"policy controls: unknown test {test!r} or not an object")
        for control, verdict in expected.items():
            if control not in ("control_sobel", "control_random"):
                raise SpecError(f"policy controls: unknown control {control!r}")
            if verdict not in ("PASS", "FAIL"):
                raise SpecError("policy controls: expected verdict must be PASS or FAIL")
        controls[test] = dict(expected)
    return Policy(doc["name"], doc["version"], rules, controls, doc, _checks(doc.get("map_checks")))


def _checks(raw: Any) -> MapChecks:
    if raw is None:
        return MapChecks()
    if not isinstance(raw, dict):
        raise SpecError("policy 'map_checks' must be an object")
    unknown = set(raw) - _CHECK_KEYS
    if unknown:
        raise SpecError(f"policy map_checks: unknown fields {sorted(unknown)}")
    values = {k: v for k, v in raw.items() if k != "why"}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise SpecError(f"policy map_checks: {key} must be a number >= 0")
        if not math.isfinite(value):
            raise SpecError(f"policy map_checks: {key} must be finite")
    return MapChecks(**{k: float(v) for k, v in values.items()})


def _rule(test: str, raw: Any) -> Rule:
    if test not in TESTS:
        raise SpecError(f"policy has a rule for unknown test {test!r} (known: {', '.join(TESTS)})")
    if not isinstance(raw, dict):
        raise SpecError(f"policy rule for {test} must be an object")
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise SpecError(f"policy rule for {test}: unknown fields {sorted(unknown)}")
    measure = raw.get("measure")
    if measure not in DECIDING_MEASURES:
        raise SpecError(f"policy rule for {test}: measure must be one of {DECIDING_MEASURES}")
    if (measure == "entropy_rise") != (test == "emprt"):
        raise SpecError(f"policy rule for {test}: entropy_rise is eMPRT's measure, and only its")
    threshold = raw.get("threshold")
    if not isinstance(threshold, int | float) or not math.isfinite(threshold):
        raise SpecError(f"policy rule for {test}: threshold must be a finite number")
    if raw.get("pass_when") not in ("below", "above"):
        raise SpecError(f"policy rule for {test}: pass_when must be 'below' or 'above'")
    if raw.get("interval", "beyond") not in ("beyond", "mean"):
        raise SpecError(f"policy rule for {test}: interval must be 'beyond' or 'mean'")
    stage = raw.get("stage", "last")
    valid_stage = stage in ("first", "last", "mean_over_stages") or (
        isinstance(stage, dict)
        and len(stage) == 1
        and (
            (isinstance(stage.get("fraction"), int | float) and 0 < stage["fraction"] <= 1)
            or (isinstance(stage.get("index"), int) and stage["index"] >= 1)
            or isinstance(stage.get("name"), str)
        )
    )
    if not valid_stage:
        raise SpecError(
            f"policy rule for {test}: stage must be 'first', 'last', 'mean_over_stages', "
            "{'fraction': f in (0, 1]}, {'index': k >= 1} or {'name': module}"
        )
    return Rule(
        measure=measure,
        stage=stage,
        threshold=float(threshold),
        pass_when=raw["pass_when"],
        interval=raw.get("interval", "beyond"),
    )


def _stage_label(stage: str | dict[str, Any]) -> str:
    if isinstance(stage, str):
        return stage
    ((key, value),) = stage.items()
    return f"{key}={value}"


@dataclass(frozen=True)
class Evidence:
    stage: str
    mean: float | None
    ci_low: float | None
    ci_high: float | None
    n: int


def evidence(scores: list[Score], rule: Rule, seed: int) -> Evidence | None:
    """The deciding number for one method under ``rule``, from its scores in one test."""
    chosen = sorted((s for s in scores if s.measure == rule.measure), key=lambda s: s.stage_index)
    if not chosen:
        return None
    stage = rule.stage
    if stage == "mean_over_stages":
        values = np.array(
            [[np.nan if v is None else v for v in s.values] for s in chosen], dtype=np.float64
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an image undefined at every stage
            per_image = np.nanmean(values, axis=0)
        first = chosen[0]
        est = bootstrap_mean(
            per_image, key_seed(seed, first.method, first.test, "mean_over_stages", rule.measure)
        )
        return Evidence("mean_over_stages", est.mean, est.ci_low, est.ci_high, est.n)
    if stage == "first":
        score = chosen[0]
    elif stage == "last" or not isinstance(stage, dict):
        score = chosen[-1]
    elif "fraction" in stage:
        score = chosen[max(1, math.ceil(stage["fraction"] * len(chosen))) - 1]
    elif "index" in stage:
        if stage["index"] > len(chosen):
            return None
        score = chosen[stage["index"] - 1]
    else:
        named = [s for s in chosen if s.stage == stage["name"]]
        if not named:
            return None
        score = named[0]
    return Evidence(score.stage, score.mean, score.ci_low, score.ci_high, score.n)


def _decide_one(ev: Evidence, rule: Rule) -> tuple[VerdictValue, str]:
    if ev.mean is None or ev.ci_low is None or ev.ci_high is None:
        return "INCONCLUSIVE", f"{rule.measure} is undefined for every image"
    below = "below" if rule.pass_when == "below" else "above"
    above = "above" if rule.pass_when == "below" else "below"
    changed = "the maps changed" if rule.measure != "entropy_rise" else "the maps' entropy rose"
    stayed = (
        "the maps stayed alike"
        if rule.measure != "entropy_rise"
        else "the maps' entropy did not rise enough"
    )
    where = (
        f"{rule.measure} at {ev.stage}: mean {ev.mean:.3f}, 95% CI [{ev.ci_low:.3f}, "
        f"{ev.ci_high:.3f}], n={ev.n}"
    )
    if rule.interval == "mean":
        low = high = ev.mean
        what = "mean"
    else:
        low, high = ev.ci_low, ev.ci_high
        what = "interval"
    on_pass_side = high < rule.threshold if rule.pass_when == "below" else low > rule.threshold
    on_fail_side = low >= rule.threshold if rule.pass_when == "below" else high <= rule.threshold
    if on_pass_side:
        return "PASS", f"{where}; the {what} lies {below} the threshold {rule.threshold}: {changed}"
    if on_fail_side:
        return (
            "FAIL",
            f"{where}; the {what} is not {below} the threshold {rule.threshold}: {stayed}",
        )
    return (
        "INCONCLUSIVE",
        f"{where}; the interval straddles the threshold {rule.threshold} "
        f"(neither entirely {below} nor {above} it)",
    )


def describe_problems(problems: list[MapProblem], limit: int = 3) -> str:
    """One sentence per problem, the first ``limit`` of them."""
    text = "; ".join(p.describe() for p in problems[:limit])
    if len(problems) > limit:
        text += f"; and {len(problems) - limit} more"
    return text


def decide(
    policy: Policy,
    tests: dict[str, TestResult],
    methods: dict[str, tuple[bool, str | None]],
    seed: int,
) -> list[Verdict]:
    """A verdict for every (method, test) run. ``methods``: name -> (is_control, the reason it
    was not applicable, or None)."""
    verdicts: list[Verdict] = []
    for test_name, test in tests.items():
        rule = policy.rules.get(test_name)
        raw: dict[str, Verdict] = {}
        problems_by_method: dict[str, list[MapProblem]] = {}
        for problem in test.map_problems:
            problems_by_method.setdefault(problem.method, []).append(problem)
        for method, (is_control, not_applicable) in methods.items():
            common: dict[str, Any] = dict(
                method=method, test=test_name, is_control=is_control, policy_version=policy.version
            )
            if test.status != "ok":
                raw[method] = Verdict(
                    verdict="INCONCLUSIVE", reason=f"test not run: {test.reason}", **common
                )
                continue
            if not_applicable is not None:
                raw[method] = Verdict(
                    verdict="INCONCLUSIVE",
                    reason=f"method not applicable: {not_applicable}",
                    **common,
                )
                continue
            if rule is None:
                raw[method] = Verdict(
                    verdict="INCONCLUSIVE",
                    reason=f"the policy {policy.name} {policy.version} has no rule for this test",
                    **common,
                )
                continue
            problems = problems_by_method.get(method)
            if problems:
                raw[method] = Verdict(
                    verdict="INCONCLUSIVE",
                    reason="maps that cannot carry a verdict: " + describe_problems(problems),
                    measure=rule.measure,
                    threshold=rule.threshold,
                    pass_when=rule.pass_when,
                    **common,
                )
                continue
            ev = evidence([s for s in test.scores if s.method == method], rule, seed)
            detail: dict[str, Any] = dict(
                measure=rule.measure,
                threshold=rule.threshold,
                pass_when=rule.pass_when,
            )
            if ev is None:
                raw[method] = Verdict(
                    verdict="INCONCLUSIVE",
                    reason=f"no {rule.measure} score at stage {_stage_label(rule.stage)} "
                    "(was the measure requested, and does the stage exist?)",
                    **detail,
                    **common,
                )
                continue
            verdict, reason = _decide_one(ev, rule)
            raw[method] = Verdict(
                verdict=verdict,
                reason=reason,
                stage=ev.stage,
                mean=ev.mean,
                ci_low=ev.ci_low,
                ci_high=ev.ci_high,
                n=ev.n,
                **detail,
                **common,
            )
        blockers = []
        if test.status == "ok" and test.details.get("memorized") is False:
            blockers.append(
                "the random-label model did not memorize its labels "
                f"({test.details.get('memorization')}), so the test cannot conclude"
            )
        for control, expected in policy.controls.get(test_name, {}).items():
            got = raw.get(control)
            if got is not None and got.verdict != expected:
                blockers.append(
                    f"control {control} got {got.verdict} where the policy expects {expected}, "
                    "so this test cannot tell methods apart here"
                )
        for v in raw.values():
            if blockers and not v.is_control and v.verdict != "INCONCLUSIVE":
                v = Verdict(
                    **{
                        **v.__dict__,
                        "verdict": "INCONCLUSIVE",
                        "reason": "; ".join(blockers) + f" (by the rule alone: {v.verdict}: "
                        f"{v.reason})",
                    }
                )
            verdicts.append(v)
    return verdicts
