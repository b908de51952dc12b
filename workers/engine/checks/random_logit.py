"""Random Logit (the computation: :func:`..sanity.random_logit`)."""

from __future__ import annotations

from .. import sanity
from ..result import TestResult
from .base import AuditContext, Check, register


@register
class RandomLogit(Check):
    name = "random_logit"
    kind = "test"
    description = "The map for the target class compared with the map for a random other class."
    reference = "Sixt et al. 2020, When Explanations Lie; Quantus RandomLogit"

    def run(self, ctx: AuditContext) -> TestResult:
        return sanity.random_logit(ctx.states, ctx.num_classes, ctx.progress)
