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
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import numpy as np

from .contract.policy import POLICY_FORMAT, PolicyMapChecks, PolicyRule, keys
from .contract.policy import Policy as PolicyDocument
from .contract.verdicts import CONTROLS
from .errors import SpecError
from .result import MapProblem, Score, TestResult, Verdict, VerdictValue
from .sequential import confidence_sequence
from .spec import MEASURES, TESTS
from .stats import bootstrap_mean, key_seed

DECIDING_MEASURES = (*MEASURES, "entropy_rise")
# the keys a document, a rule and the map checks may have: the contract's declarations
_RULE_KEYS = keys(PolicyRule)
# stage selectors that summarize the whole curve: need stages that accumulate randomization
CURVE_TESTS = ("cascading", "cascading_bottom_up")
_TOP_KEYS = keys(PolicyDocument)
_CHECK_KEYS = keys(PolicyMapChecks)


@dataclass(frozen=True)
class Rule:
    """How one test's scores become a verdict (see the module docstring).

    ``threshold`` bounds the PASS side and ``fail_threshold`` the FAIL side (the same number
    unless the rule keeps an indifference zone between them, where no number of images decides
    and the verdict stays INCONCLUSIVE). ``scale``: ``"controls"`` maps each stage's similarity
    onto the range the two controls span at that stage on this model, ``(s - random) / (sobel -
    random)``, before the stage summary."""

    measure: str
    stage: str | dict[str, Any]
    threshold: float
    pass_when: Literal["below", "above"]
    interval: Literal["beyond", "mean"] = "beyond"
    fail_threshold: float | None = None
    scale: Literal["none", "controls"] = "none"

    @property
    def fail_bound(self) -> float:
        return self.threshold if self.fail_threshold is None else self.fail_threshold


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

    ``conservation_tolerance``: a ``total`` relevance method (LRP to the input) must distribute
    the target logit within this relative tolerance on every image. A ``share`` method
    (Relevance-CAM) reports the share of the target's relevance reaching its layer: the layer
    may sit inside a residual branch, where the proportional split of a sum of opposite signs
    hands one branch more than all of it and the other a negative share (1.09 and -0.06 on the
    bundled shapes ResNet), so only a share that is not finite or beyond ``share_bound`` either
    way (relevance multiplied, as broken rules do: 1e24 was seen) counts as not conserved."""

    zero_floor: float = 1e-12
    constant_rtol: float = 1e-6
    conservation_tolerance: float = 0.05
    share_bound: float = 2.0


@dataclass(frozen=True)
class Policy:
    name: str
    version: str
    rules: dict[str, Rule]
    controls: dict[str, dict[str, VerdictValue]]
    document: dict[str, Any]
    checks: MapChecks = MapChecks()
    # the image count from which the calibration models' verdicts were decided and stable
    recommended_images: int | None = None


def default_document() -> dict[str, Any]:
    text = (
        resources.files("saliency_audit.workers.engine")
        .joinpath("policies/default.json")
        .read_text()
    )
    return dict(json.loads(text))


def rule_stages(document: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stage selector of each test's rule in the policy ``document`` (None: the shipped
    default): what a stage plan and the cost count read (``contract.cost.planned_stages``)."""
    return {test: rule.stage for test, rule in load_policy(document).rules.items()}


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
            if control not in CONTROLS:
                raise SpecError(f"policy controls: unknown control {control!r}")
            if verdict not in ("PASS", "FAIL"):
                raise SpecError("policy controls: expected verdict must be PASS or FAIL")
        controls[test] = dict(expected)
    recommended = doc.get("recommended_images")
    if recommended is not None:
        if not isinstance(recommended, dict) or not isinstance(recommended.get("images"), int):
            raise SpecError("policy recommended_images must be {'images': n, 'why': ...}")
        recommended = recommended["images"]
    return Policy(
        doc["name"],
        doc["version"],
        rules,
        controls,
        doc,
        _checks(doc.get("map_checks")),
        recommended,
    )


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
    area = stage.get("area") if isinstance(stage, dict) else None
    valid_area = (
        isinstance(area, list | tuple)
        and len(area) == 2
        and all(isinstance(v, int | float) for v in area)
        and 0 <= area[0] < area[1] <= 1
    )
    valid_stage = stage in ("first", "last", "mean_over_stages") or (
        isinstance(stage, dict)
        and len(stage) == 1
        and (
            (isinstance(stage.get("fraction"), int | float) and 0 < stage["fraction"] <= 1)
            or (isinstance(stage.get("index"), int) and stage["index"] >= 1)
            or isinstance(stage.get("name"), str)
            or valid_area
        )
    )
    if not valid_stage:
        raise SpecError(
            f"policy rule for {test}: stage must be 'first', 'last', 'mean_over_stages', "
            "{'fraction': f in (0, 1]}, {'index': k >= 1}, {'name': module} or "
            "{'area': [a, b]} with 0 <= a < b <= 1"
        )
    if area is not None and test not in CURVE_TESTS:
        raise SpecError(
            f"policy rule for {test}: an area summarizes a cascade; only {CURVE_TESTS} have one"
        )
    fail_threshold = raw.get("fail_threshold")
    if fail_threshold is not None:
        if not isinstance(fail_threshold, int | float) or not math.isfinite(fail_threshold):
            raise SpecError(f"policy rule for {test}: fail_threshold must be a finite number")
        wrong_side = (
            fail_threshold < threshold
            if raw["pass_when"] == "below"
            else fail_threshold > threshold
        )
        if wrong_side:
            raise SpecError(
                f"policy rule for {test}: fail_threshold must lie on the fail side of threshold"
            )
    scale = raw.get("scale", "none")
    if scale not in ("none", "controls"):
        raise SpecError(f"policy rule for {test}: scale must be 'none' or 'controls'")
    if scale == "controls" and measure == "entropy_rise":
        raise SpecError(f"policy rule for {test}: only similarities can be scaled by controls")
    return Rule(
        measure=measure,
        stage=stage,
        threshold=float(threshold),
        pass_when=raw["pass_when"],
        interval=raw.get("interval", "beyond"),
        fail_threshold=None if fail_threshold is None else float(fail_threshold),
        scale=scale,
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
    sd: float | None = None  # per-image standard deviation of the deciding value
    # the interval: a fixed-n ``bootstrap`` (:mod:`.stats`) or an anytime-valid confidence
    # ``sequence`` (:mod:`.sequential`, adaptive audits)
    interval: Literal["bootstrap", "sequence"] = "bootstrap"


# A similarity (SSIM, Spearman, Pearson of HOG features) lies in [-1, 1]; an adaptive audit's
# confidence sequence needs the bounds of what it averages (eMPRT's entropy rise has none).
SIMILARITY_BOUNDS = (-1.0, 1.0)
BOUNDED_MEASURES = MEASURES


def _values(score: Score) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in score.values], dtype=np.float64)


def _estimate(stage: str, per_image: np.ndarray, seed: int, *key: str) -> Evidence:
    est = bootstrap_mean(per_image, key_seed(seed, *key))
    finite = per_image[np.isfinite(per_image)]
    sd = float(finite.std(ddof=1)) if finite.size > 1 else None
    return Evidence(stage, est.mean, est.ci_low, est.ci_high, est.n, sd)


def stage_fractions(test: TestResult) -> dict[int, float]:
    """Per stage index, the fraction of the randomizable modules randomized at that stage (the
    last stage of a cascade randomizes them all): the x axis of a randomization curve, the same
    for every granularity."""
    total = max((len(s.randomized) for s in test.stages), default=0)
    if total == 0:
        return {}
    return {s.index: len(s.randomized) / total for s in test.stages}


def curve_area(stages: list[tuple[float, np.ndarray]], start: float, end: float) -> np.ndarray:
    """Per image, the mean of a randomization curve over the fraction ``[start, end]`` of the
    modules randomized. ``stages`` are (fraction, per-image values) in cascade order; the curve
    is a step function that holds each stage's value from the previous stage's fraction to its
    own (the state of the model there is the state that stage reaches), so block and module
    granularities sample the same curve. NaN where an image has no defined value in the span."""
    ordered = sorted(stages, key=lambda item: item[0])
    n = ordered[0][1].shape[0] if ordered else 0
    total = np.zeros(n)
    weight = np.zeros(n)
    previous = 0.0
    for fraction, values in ordered:
        lo, hi = max(previous, start), min(fraction, end)
        if hi > lo:
            defined = np.isfinite(values)
            total += np.where(defined, values, 0.0) * (hi - lo)
            weight += defined * (hi - lo)
        previous = fraction
        if previous >= end:
            break
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight > 0, total / np.where(weight > 0, weight, 1.0), np.nan)


@dataclass(frozen=True)
class Deciding:
    """The per-image values a rule decides on for one method (in image order), before they are
    reduced to a mean and an interval: ``stage`` labels them, ``bounds`` are the interval the
    values cannot leave (None: unbounded), ``score`` is the single stage's stored score when
    the values are that score's own (unscaled), and ``key`` seeds their bootstrap."""

    stage: str
    values: np.ndarray
    bounds: tuple[float, float] | None
    score: Score | None
    key: tuple[str, ...]


def fill_skipped(
    measured: list[tuple[float, np.ndarray]], fractions: list[float]
) -> list[tuple[float, np.ndarray]]:
    """A curve measured at some stages (a stage plan, :mod:`.contract.stage_plan`), completed at
    the ``fractions`` of the stages skipped between two measured ones: per image, linear
    interpolation in the fraction randomized between the measured neighbours (NaN where one of
    them is). Stages before the first or after the last measured one are left out. With every
    stage measured the curve is returned as it is, so the area is the full curve's; it is also
    the full curve's when that curve runs linearly between the measured stages."""
    ordered = sorted(measured, key=lambda item: item[0])
    known = [f for f, _ in ordered]
    filled = list(ordered)
    for fraction in fractions:
        if fraction in known or not known[0] < fraction < known[-1]:
            continue
        right = next(i for i, f in enumerate(known) if f > fraction)
        (f0, v0), (f1, v1) = ordered[right - 1], ordered[right]
        filled.append((fraction, v0 + (v1 - v0) * ((fraction - f0) / (f1 - f0))))
    return sorted(filled, key=lambda item: item[0])


def deciding_values(
    scores: list[Score],
    rule: Rule,
    *,
    fractions: dict[int, float] | None = None,
    controls: dict[str, list[Score]] | None = None,
    stage_count: int | None = None,
) -> Deciding | None:
    """The per-image deciding values for one method under ``rule``, from its scores in one
    test (see :func:`evidence`); None when the rule's measure or stage is missing.

    ``stage_count``: the test's stages (measured or not; default: the highest stage scored).
    Stages are found by their index, so a test that measured only the stages its rule reads (a
    stage plan) decides exactly as one that measured them all; an area completes the skipped
    stages inside its span with :func:`fill_skipped`."""
    chosen = sorted((s for s in scores if s.measure == rule.measure), key=lambda s: s.stage_index)
    if not chosen:
        return None
    scaled = _scaled(chosen, rule, controls)
    if scaled is None:
        return None
    bounds = deciding_bounds(chosen, rule, controls)
    first = chosen[0]
    stage = rule.stage
    if isinstance(stage, dict) and "area" in stage:
        if not fractions:
            return None
        start, end = (float(v) for v in stage["area"])
        pairs = [(fractions[s.stage_index], v) for s, v in zip(chosen, scaled, strict=True)]
        label = f"area {start:g}-{end:g}"
        key = (first.method, first.test, label, rule.measure)
        per_image = curve_area(fill_skipped(pairs, list(fractions.values())), start, end)
        return Deciding(label, per_image, bounds, None, key)
    if stage == "mean_over_stages":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an image undefined at every stage
            per_image = np.nanmean(np.stack(scaled), axis=0)
        key = (first.method, first.test, "mean_over_stages", rule.measure)
        return Deciding("mean_over_stages", per_image, bounds, None, key)
    total = stage_count or chosen[-1].stage_index
    position = {s.stage_index: k for k, s in enumerate(chosen)}
    if stage == "first":
        index = 1
    elif stage == "last" or not isinstance(stage, dict):
        index = total
    elif "fraction" in stage:
        index = max(1, math.ceil(stage["fraction"] * total))
    elif "index" in stage:
        index = stage["index"]
    else:
        named = [s.stage_index for s in chosen if s.stage == stage["name"]]
        if not named:
            return None
        index = named[0]
    if index not in position:
        return None
    k = position[index]
    score = chosen[k]
    key = (score.method, score.test, score.stage, "scaled")
    own = score if rule.scale == "none" else None
    return Deciding(score.stage, scaled[k], bounds, own, key)


def deciding_bounds(
    chosen: list[Score], rule: Rule, controls: dict[str, list[Score]] | None
) -> tuple[float, float] | None:
    """The interval a rule's per-image value cannot leave: [-1, 1] for a similarity; scaled by
    the controls, (s - r) / (c - r) of s in [-1, 1] at each stage, the widest of the stages'
    [(-1 - r) / (c - r), (1 - r) / (c - r)] (an area or a mean over stages is a weighted mean
    of stage values, so it stays inside); None for eMPRT's entropy rise (unbounded above)."""
    if rule.measure not in BOUNDED_MEASURES:
        return None
    low, high = SIMILARITY_BOUNDS
    if rule.scale == "none":
        return low, high
    spans = _control_spans(chosen, rule, controls)
    ends = [((low - r) / (c - r), (high - r) / (c - r)) for r, c in spans.values()]
    return min(e[0] for e in ends), max(e[1] for e in ends)


def evidence(
    scores: list[Score],
    rule: Rule,
    seed: int,
    *,
    fractions: dict[int, float] | None = None,
    controls: dict[str, list[Score]] | None = None,
    looks: Sequence[int] | None = None,
    stage_count: int | None = None,
) -> Evidence | None:
    """The deciding number for one method under ``rule``, from its scores in one test.

    ``fractions`` (:func:`stage_fractions`) place the stages on the curve for an ``area``;
    ``controls`` (the two controls' scores in the same test) scale similarities for
    ``scale: "controls"``. With ``looks`` (the numbers of images seen at each look of an
    adaptive audit, the last being every image scored) the interval is the anytime-valid
    confidence sequence over those looks (:mod:`.sequential`) instead of the bootstrap.
    ``stage_count``: as :func:`deciding_values`."""
    picked = deciding_values(
        scores, rule, fractions=fractions, controls=controls, stage_count=stage_count
    )
    if picked is None:
        return None
    if looks is not None:
        if picked.bounds is None:
            raise SpecError(f"{rule.measure} is unbounded: no confidence sequence for it")
        cs = confidence_sequence(picked.values, picked.bounds, looks)
        finite = picked.values[np.isfinite(picked.values)]
        sd = float(finite.std(ddof=1)) if finite.size > 1 else None
        if cs is None:
            return Evidence(picked.stage, None, None, None, 0, None, "sequence")
        return Evidence(picked.stage, cs.mean, cs.low, cs.high, cs.n, sd, "sequence")
    if picked.score is not None:
        score = picked.score
        finite = _values(score)
        finite = finite[np.isfinite(finite)]
        sd = float(finite.std(ddof=1)) if finite.size > 1 else None
        return Evidence(score.stage, score.mean, score.ci_low, score.ci_high, score.n, sd)
    return _estimate(picked.stage, picked.values, seed, *picked.key)


def _control_spans(
    chosen: list[Score], rule: Rule, controls: dict[str, list[Score]] | None
) -> dict[int, tuple[float, float]]:
    """Per stage index, the means of (control_random, control_sobel) under the rule's
    measure; stages where either is missing are left out."""
    by_stage: dict[str, dict[int, float]] = {}
    for control in ("control_random", "control_sobel"):
        for score in (controls or {}).get(control, []):
            if score.measure == rule.measure and score.mean is not None:
                by_stage.setdefault(control, {})[score.stage_index] = score.mean
    spans = {}
    for score in chosen:
        low = by_stage.get("control_random", {}).get(score.stage_index)
        high = by_stage.get("control_sobel", {}).get(score.stage_index)
        if low is not None and high is not None:
            spans[score.stage_index] = (low, high)
    return spans


def _scaled(
    chosen: list[Score], rule: Rule, controls: dict[str, list[Score]] | None
) -> list[np.ndarray] | None:
    """Per stage, the per-image values; with ``scale: "controls"``, mapped onto the span the
    controls reach at that stage: ``(s - mean random) / (mean sobel - mean random)``."""
    values = [_values(s) for s in chosen]
    if rule.scale == "none":
        return values
    spans = _control_spans(chosen, rule, controls)
    out = []
    for score, v in zip(chosen, values, strict=True):
        span = spans.get(score.stage_index)
        if span is None or not span[1] > span[0]:
            return None
        low, high = span
        out.append((v - low) / (high - low))
    return out


def images_to_decide(ev: Evidence, rule: Rule) -> int | None:
    """About how many images would put the 95% interval wholly on the side of a threshold the
    mean already lies on (normal approximation from the per-image spread: 1.96 sd / sqrt(n)
    against the distance to it); None when the mean lies between the thresholds (no number of
    images decides) or the spread is unknown."""
    if ev.mean is None or ev.sd is None:
        return None
    below = rule.pass_when == "below"
    if (ev.mean < rule.threshold) if below else (ev.mean > rule.threshold):
        gap = abs(rule.threshold - ev.mean)
    elif (ev.mean >= rule.fail_bound) if below else (ev.mean <= rule.fail_bound):
        gap = abs(ev.mean - rule.fail_bound)
    else:
        return None
    if gap <= 0:
        return None
    return max(ev.n + 1, math.ceil((1.96 * ev.sd / gap) ** 2))


def interval_verdicts(
    low: np.ndarray | float, high: np.ndarray | float, rule: Rule
) -> tuple[np.ndarray, np.ndarray]:
    """(PASS, FAIL) of intervals [low, high] under ``rule``'s thresholds, elementwise: PASS when
    the whole interval lies on the pass side of ``threshold``, FAIL when it lies at or beyond
    ``fail_bound`` (touching counts as the fail side). An adaptive audit and its simulation
    (tests/engine/test_sequential.py) decide with this same function."""
    low, high = np.asarray(low), np.asarray(high)
    if rule.pass_when == "below":
        return high < rule.threshold, low >= rule.fail_bound
    return low > rule.threshold, high <= rule.fail_bound


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
    scaled = " (scaled by the controls)" if rule.scale == "controls" else ""
    sequence = ev.interval == "sequence"
    kind = "95% confidence sequence" if sequence else "95% CI"
    where = (
        f"{rule.measure}{scaled} at {ev.stage}: mean {ev.mean:.3f}, {kind} [{ev.ci_low:.3f}, "
        f"{ev.ci_high:.3f}], n={ev.n}"
    )
    if rule.interval == "mean":
        low = high = ev.mean
        what = "mean"
    else:
        low, high = ev.ci_low, ev.ci_high
        what = "interval"
    fail = rule.fail_bound
    on_pass_side, on_fail_side = interval_verdicts(low, high, rule)
    if on_pass_side:
        return "PASS", f"{where}; the {what} lies {below} the threshold {rule.threshold}: {changed}"
    if on_fail_side:
        return (
            "FAIL",
            f"{where}; the {what} is not {below} the threshold {fail}: {stayed}",
        )
    if fail == rule.threshold:
        why = (
            f"the interval straddles the threshold {rule.threshold} (neither entirely {below} "
            f"nor {above} it)"
        )
    else:
        why = (
            f"the interval reaches between the PASS threshold {rule.threshold} and the FAIL "
            f"threshold {fail}"
        )
    # the normal approximation speaks of a fixed-n interval, not of a confidence sequence
    needed = None if sequence else images_to_decide(ev, rule)
    in_zone = (
        rule.threshold <= ev.mean < fail
        if rule.pass_when == "below"
        else fail < ev.mean <= rule.threshold
    )
    if needed is not None:
        why += f"; about {needed} images would likely decide it"
    elif ev.mean is not None and rule.interval == "beyond" and (in_zone or not sequence):
        why += (
            "; the mean lies in the undecided zone between the thresholds: more images decide "
            "it only if the mean moves out of the zone"
        )
    elif sequence:
        why += "; more images would likely decide it"
    return "INCONCLUSIVE", f"{where}; {why}"


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
    *,
    looks: Sequence[int] | None = None,
) -> list[Verdict]:
    """A verdict for every (method, test) run. ``methods``: name -> (is_control, the reason it
    was not applicable, or None). ``looks``: an adaptive audit's numbers of images seen at each
    of its looks so far; the intervals are then its anytime-valid confidence sequences."""
    verdicts: list[Verdict] = []
    for test_name, test in tests.items():
        rule = policy.rules.get(test_name)
        raw: dict[str, Verdict] = {}
        fractions = stage_fractions(test)
        controls = {
            c: [s for s in test.scores if s.method == c]
            for c in ("control_random", "control_sobel")
        }
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
                    fail_threshold=rule.fail_bound,
                    pass_when=rule.pass_when,
                    **common,
                )
                continue
            ev = evidence(
                [s for s in test.scores if s.method == method],
                rule,
                seed,
                fractions=fractions,
                controls=controls,
                looks=looks,
                stage_count=len(test.stages) or None,
            )
            detail: dict[str, Any] = dict(
                measure=rule.measure,
                threshold=rule.threshold,
                fail_threshold=rule.fail_bound,
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


def pending_verdicts(policy: Policy, verdicts: list[Verdict]) -> list[Verdict]:
    """The verdicts more images could still decide: INCONCLUSIVE with an interval (it reaches
    across a threshold, or a control that is itself still open blocks it), in a test whose
    controls did not get a wrong verdict (then every verdict of the test stays INCONCLUSIVE
    whatever more images show). INCONCLUSIVE for a reason that is no matter of sample size (not
    applicable, maps that cannot carry a verdict, no rule, a test not run) is not pending."""
    settled = {
        v.test
        for v in verdicts
        if v.is_control
        and v.verdict != "INCONCLUSIVE"
        and policy.controls.get(v.test, {}).get(v.method, v.verdict) != v.verdict
    }
    return [
        v
        for v in verdicts
        if v.verdict == "INCONCLUSIVE" and v.ci_low is not None and v.test not in settled
    ]
