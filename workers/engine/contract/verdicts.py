"""Verdicts: the three values, the two controls, and the decision for one (method, test).

:class:`Verdict` is the one declaration of the verdict shape: the engine builds it, report.json
writes it (``dataclasses.asdict``), the service stores one database row per verdict with its
fields as columns, and the API and the OpenAPI document render it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, get_args

from pydantic import ConfigDict, Field

VerdictValue = Literal["PASS", "FAIL", "INCONCLUSIVE"]
VERDICTS: tuple[VerdictValue, ...] = get_args(VerdictValue)

ControlName = Literal["control_sobel", "control_random"]
# the two control "methods" every audit runs beside the requested ones: an edge detector (its
# maps do not depend on the model) and random maps
CONTROLS: tuple[ControlName, ...] = get_args(ControlName)

# how a rule reads its score: a method passes when the score is below (similarities: its maps
# changed) or above (eMPRT's entropy rise) the threshold
PassWhen = Literal["below", "above"]

Count = Annotated[int, Field(ge=0)]


@dataclass(frozen=True)
class Verdict:
    """PASS / FAIL / INCONCLUSIVE for one (method, test), with the evidence and the rule."""

    __pydantic_config__ = ConfigDict(
        extra="forbid", json_schema_serialization_defaults_required=True
    )

    method: str
    test: str
    verdict: VerdictValue
    reason: str
    measure: str | None = None
    stage: str | None = None
    threshold: float | None = None
    # the FAIL side's bound: equal to ``threshold`` unless the rule keeps an indifference zone
    fail_threshold: float | None = None
    pass_when: PassWhen | None = None
    mean: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    n: Count = 0
    is_control: bool = False
    policy_version: str | None = None
