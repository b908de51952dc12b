"""What ``GET /v1/methods`` lists: the methods, tests and measures, and the default policy.

:class:`MethodInfo` is the registry's record of a method (``workers/engine/methods``) and the
catalogue entry ``catalogue.json`` stores; :class:`CatalogueFile` is that file, and
:class:`Catalogue` the response, which adds the default policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

from .policy import Policy
from .spec import Measure, TestName


@dataclass(frozen=True)
class MethodInfo:
    """What the registry knows about a method, for discovery and reports."""

    __pydantic_config__ = ConfigDict(
        extra="forbid", json_schema_serialization_defaults_required=True
    )

    name: str
    family: str
    reference: str
    description: str
    needs_conv_layer: bool = False
    is_control: bool = False
    # relevance methods report conservation: "total" (the map's sum should equal the target
    # logit: LRP to the input) or "share" (the share of the target's relevance reaching a
    # layer, at most about 1: Relevance-CAM); None for the others
    relevance: Literal["total", "share"] | None = None
    # the map's values scale as the explained score to this power (squared gradients: 2)
    scale_power: int = 1


class TestInfo(BaseModel):
    """A test an audit can run, with what it measures and where it comes from."""

    __test__ = False  # a catalogue entry, not a pytest test class
    model_config = ConfigDict(extra="forbid")

    name: TestName
    description: str
    reference: str


class CatalogueFile(BaseModel):
    """``workers/engine/catalogue.json``: generated from the torch registry."""

    model_config = ConfigDict(extra="forbid")

    methods: list[MethodInfo]
    tests: list[TestInfo]
    measures: list[Measure]


class Catalogue(CatalogueFile):
    """Every saliency method, test and similarity measure, and the default verdict policy."""

    default_policy: Policy
