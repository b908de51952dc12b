"""Which stages of a model randomization test get maps: the stages the verdict rule reads.

A cascade randomizes one unit per stage (Adebayo et al. 2018, section 3.1), and the paper draws
maps at every stage. The policy decides on far less: the shipped cascading rule reads the area
under the first quarter of the curve (``{"area": [0, 0.25]}``), bottom-up reads its first stage,
so on a ResNet-18 at module granularity two thirds of the map sets a full cascade computes are
never read by a verdict. A *stage plan* names the stages whose maps are computed (the others are
still randomized on the way, cumulatively, which costs a weight re-draw and no pass):

* ``stages: "all"``: every stage, the paper's full per-unit curve;
* ``stages: "rule"`` (the default): what the policy's rule for the test reads, read from the
  loaded policy (never assumed): ``first``, ``last``, ``{"index": k}``, ``{"fraction": f}``
  and ``{"name": unit}`` read one stage, ``mean_over_stages`` reads every stage, and
  ``{"area": [a, b]}`` reads every stage whose step of the curve overlaps the span [a, b] of
  the modules randomized (:func:`~saliency_audit.workers.engine.policy.curve_area`); when those
  are more than :data:`DEFAULT_POINTS`, that many are spread evenly over them (the first and the
  last of the span always among them), and the area interpolates the skipped ones linearly
  between their measured neighbours (:func:`~saliency_audit.workers.engine.policy.fill_skipped`).
  A test the policy has no rule for keeps every stage.

The last stage (every unit randomized) is always computed, so a report's curve shows where it
ends. Torch-free: the API prices an audit by its planned stages (``contract/cost.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import ConfigDict

StageMode = Literal["rule", "all"]
STAGE_MODES: tuple[str, ...] = get_args(StageMode)
# The most stages computed inside an area's span. The calibration models' curves are smooth
# enough over the span that 8 evenly spread points give the same verdicts as every stage
# (docs/policy.md, "Only the stages the rule reads"); a span of at most 8 stages is computed
# whole, and its area is then exactly the full curve's.
DEFAULT_POINTS = 8


@dataclass(frozen=True)
class StagePlan:
    """Which stages of one test got maps, and why. ``rule`` is the policy rule's stage selector
    in words (None: no rule); ``window`` the span [a, b] of the modules randomized an area rule
    reads; ``points`` the most stages computed in that span (set when it held more and was
    thinned); ``computed`` the 1-based indices of the stages whose maps were computed, of
    ``total``."""

    __pydantic_config__ = ConfigDict(
        extra="forbid", json_schema_serialization_defaults_required=True
    )

    mode: StageMode
    rule: str | None
    window: tuple[float, float] | None
    points: int | None
    computed: tuple[int, ...]
    total: int
    why: str

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StagePlan:
        window = data.get("window")
        return cls(
            **{
                **data,
                "window": None if window is None else (float(window[0]), float(window[1])),
                "computed": tuple(data["computed"]),
            }
        )


def selector_text(stage: Any) -> str:
    """A rule's stage selector in words: ``first``, ``area 0-0.25``, ``index 3``."""
    if isinstance(stage, str):
        return stage
    if isinstance(stage, Mapping) and len(stage) == 1:
        ((key, value),) = stage.items()
        if key == "area":
            return f"area {value[0]:g}-{value[1]:g}"
        return f"{key} {value}"
    return str(stage)


def spread(count: int, points: int) -> list[int]:
    """``points`` positions out of ``0 .. count - 1``, evenly spread, the first and the last
    included: position j is j (count - 1) / (points - 1) rounded half up (all of them when
    ``count <= points``)."""
    if count <= points:
        return list(range(count))
    if points < 2:
        raise ValueError("a span needs at least 2 points: its first and its last stage")
    # integer arithmetic: round half up of j * (count - 1) / (points - 1)
    return [(2 * j * (count - 1) + (points - 1)) // (2 * (points - 1)) for j in range(points)]


def area_window(fractions: Sequence[float], start: float, end: float) -> list[int]:
    """The 1-based stages whose step of the curve overlaps [start, end] with positive length:
    stage i holds its value from the previous stage's fraction to its own
    (:func:`~saliency_audit.workers.engine.policy.curve_area`), so it counts when its fraction
    is above ``start`` and the previous one below ``end``."""
    window = []
    previous = 0.0
    for i, fraction in enumerate(fractions, start=1):
        if min(fraction, end) > max(previous, start):
            window.append(i)
        previous = fraction
    return window


def plan_stages(
    fractions: Sequence[float],
    rule_stage: Any,
    *,
    mode: StageMode = "rule",
    points: int = DEFAULT_POINTS,
    names: Sequence[str] = (),
) -> StagePlan:
    """The stages of a test whose maps are computed (see the module text).

    ``fractions``: per stage in order, the fraction of the model's randomizable modules random
    at it (the x axis of the curve); ``rule_stage``: the stage selector of the policy's rule
    for the test (None when it has none); ``names``: the stages' unit names, for a ``name``
    selector."""
    total = len(fractions)
    every = tuple(range(1, total + 1))
    label = None if rule_stage is None else selector_text(rule_stage)
    if mode == "all":
        return StagePlan(mode, label, None, None, every, total, "every stage (stages: all)")
    if rule_stage is None:
        why = "the policy has no rule for this test: every stage"
        return StagePlan(mode, None, None, None, every, total, why)
    last = f"and the last stage ({total}, every unit randomized) for the end of the curve"
    window: tuple[float, float] | None = None
    thinned: int | None = None
    read: list[int]
    if rule_stage == "mean_over_stages":
        return StagePlan(mode, label, None, None, every, total, "the rule averages every stage")
    if rule_stage == "first":
        read = [1]
    elif rule_stage == "last":
        read = [total]
    elif isinstance(rule_stage, Mapping) and "fraction" in rule_stage:
        read = [max(1, math.ceil(float(rule_stage["fraction"]) * total))]
    elif isinstance(rule_stage, Mapping) and "index" in rule_stage:
        read = [int(rule_stage["index"])] if int(rule_stage["index"]) <= total else []
    elif isinstance(rule_stage, Mapping) and "name" in rule_stage:
        read = [i for i, name in enumerate(names, start=1) if name == rule_stage["name"]][:1]
    elif isinstance(rule_stage, Mapping) and "area" in rule_stage:
        start, end = (float(v) for v in rule_stage["area"])
        window = (start, end)
        span = area_window(fractions, start, end)
        read = [span[p] for p in spread(len(span), points)]
        if len(span) > points:
            thinned = points
    else:
        raise ValueError(f"unknown stage selector {rule_stage!r}")
    computed = tuple(sorted({*read, total}))
    if window is not None:
        held = (
            f"the rule reads the area {window[0]:g}-{window[1]:g} of the curve, {len(span)} stages"
        )
        if thinned is not None:
            why = (
                f"{held}: {thinned} of them spread evenly over it (the area interpolates the "
                f"others linearly), {last}"
            )
        else:
            why = f"{held}: all of them, {last}"
    elif read:
        why = f"the rule reads stage {read[0]} ({label}), {last}"
    else:
        why = f"no stage matches the rule's {label}: only the last stage"
    return StagePlan(mode, label, window, thinned, computed, total, why)


def planned_count(
    stages: int, rule_stage: Any, mode: StageMode = "rule", points: int = DEFAULT_POINTS
) -> int:
    """How many of a test's ``stages`` stages get maps, with every stage randomizing an equal
    share of the modules (what a submit knows of a model before a worker loads it)."""
    if isinstance(rule_stage, Mapping) and "name" in rule_stage and mode == "rule":
        return min(stages, 2)  # the named stage (unknown before the model is loaded) and the last
    fractions = [i / stages for i in range(1, stages + 1)]
    return len(plan_stages(fractions, rule_stage, mode=mode, points=points).computed)
