"""What the three model parameter randomization tests share (Adebayo et al. 2018, section 3.1):
one stage per randomization unit, each stage's maps compared with the trained model's. The
tests differ only in the order of their stages (:func:`~..randomization.stages`). Which stages
get maps is planned from the policy's rule for the test (:mod:`..contract.stage_plan`)."""

from __future__ import annotations

from typing import ClassVar

from .. import sanity
from ..contract.stage_plan import planned_count
from ..policy import load_policy
from ..randomization import ModelTest
from ..result import TestResult
from ..spec import AuditSpec
from .base import AuditContext, Check


class ModelRandomization(Check):
    name: ClassVar[ModelTest]
    kind = "test"

    def cost(self, spec: AuditSpec, n_units: int) -> float:
        rule = load_policy(spec.policy).rules.get(self.name)
        stage = rule.stage if rule is not None else None
        return float(planned_count(n_units, stage, spec.stages))  # one map set per stage

    def run(self, ctx: AuditContext) -> TestResult:
        rule = ctx.policy.rules.get(self.name)
        return sanity.model_randomization(
            ctx.states,
            test=self.name,
            granularity=ctx.spec.granularity,
            progress=ctx.progress,
            mode=ctx.spec.stages,
            rule_stage=rule.stage if rule is not None else None,
        )
