"""The verdict policy document: its keys, rules, stage selectors and map checks.

The shape only; :func:`saliency_audit.workers.engine.policy.load_policy` checks a document against
the rules
that span fields (an area only for a cascade, a fail threshold on the fail side, ...) with its
own messages, and takes its key sets from these declarations.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from .spec import Measure, TestName
from .verdicts import ControlName, PassWhen

POLICY_FORMAT = 1
DecidingMeasure = Measure | Literal["entropy_rise"]
ExpectedControlVerdict = Literal["PASS", "FAIL"]

_CLOSED = ConfigDict(extra="forbid")
Finite = Annotated[float, Field(allow_inf_nan=False)]
NonNegativeFinite = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class StageFraction(BaseModel):
    model_config = _CLOSED
    fraction: Annotated[float, Field(gt=0, le=1)]


class StageIndex(BaseModel):
    model_config = _CLOSED
    index: Annotated[int, Field(ge=1, description="1-based")]


class StageName(BaseModel):
    model_config = _CLOSED
    name: str


class StageArea(BaseModel):
    """The mean over the share [a, b] of a cascade's curve (0 <= a < b <= 1)."""

    model_config = _CLOSED
    area: tuple[Annotated[float, Field(ge=0, le=1)], Annotated[float, Field(ge=0, le=1)]]


StageSelector = (
    Literal["first", "last", "mean_over_stages"]
    | StageFraction
    | StageIndex
    | StageName
    | StageArea
)


class PolicyRule(BaseModel):
    """How one test's scores become a verdict (workers/engine/policy.py, docs/policy.md)."""

    model_config = _CLOSED

    measure: DecidingMeasure
    stage: StageSelector = "last"
    threshold: Finite
    fail_threshold: Finite | None = None
    scale: Literal["none", "controls"] = "none"
    pass_when: PassWhen
    interval: Literal["beyond", "mean"] = "beyond"
    why: str | None = None


class PolicyMapChecks(BaseModel):
    """When a map cannot carry a verdict (workers/engine/policy.py MapChecks)."""

    model_config = _CLOSED

    zero_floor: NonNegativeFinite | None = None
    constant_rtol: NonNegativeFinite | None = None
    share_bound: NonNegativeFinite | None = None
    conservation_tolerance: NonNegativeFinite | None = None
    why: str | None = None


class RecommendedImages(BaseModel):
    model_config = _CLOSED

    images: int
    why: str | None = None


class Policy(BaseModel):
    """A verdict policy document: a rule per test and the verdict each control must get;
    ``extends: "default"`` makes a partial document replace the default's entries."""

    model_config = _CLOSED

    format: Literal[1]
    name: Annotated[str, Field(min_length=1)]
    version: Annotated[str, Field(min_length=1)]
    description: str | None = None
    extends: Literal["default"] | None = None
    tests: dict[TestName, PolicyRule]
    controls: dict[TestName, dict[ControlName, ExpectedControlVerdict]] = Field(
        default_factory=dict
    )
    map_checks: PolicyMapChecks | None = None
    recommended_images: RecommendedImages | None = None


def keys(shape: type[BaseModel]) -> set[str]:
    """The keys a policy object of this shape may have."""
    return set(shape.model_fields)
