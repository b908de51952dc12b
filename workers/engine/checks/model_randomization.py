"""What the three model parameter randomization tests share (Adebayo et al. 2018, section 3.1):
one stage per randomization unit, each stage's maps compared with the trained model's. The
tests differ only in the order of their stages (:func:`~..randomization.stages`)."""

from __future__ import annotations

from typing import ClassVar

from .. import sanity
from ..randomization import ModelTest
from ..result import TestResult
from ..spec import AuditSpec
from .base import AuditContext, Check


class ModelRandomization(Check):
    name: ClassVar[ModelTest]
    kind = "test"

    def cost(self, spec: AuditSpec, n_units: int) -> float:
        return float(n_units)  # one map set per stage

    def run(self, ctx: AuditContext) -> TestResult:
        return sanity.model_randomization(
            ctx.states, test=self.name, granularity=ctx.spec.granularity, progress=ctx.progress
        )
