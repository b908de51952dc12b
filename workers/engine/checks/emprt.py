"""Efficient MPRT (the computation: :func:`..sanity.emprt`)."""

from __future__ import annotations

from .. import sanity
from ..result import TestResult
from .base import AuditContext, Check, register


@register
class EfficientMPRT(Check):
    name = "emprt"
    kind = "test"
    description = (
        "Efficient MPRT: relative rise of the discrete entropy of each map from the trained "
        "to the fully randomized model, (H_random - H_trained) / H_trained."
    )
    reference = "Hedstrom et al. 2023, eMPRT (Quantus EfficientMPRT, discrete_entropy)"

    def run(self, ctx: AuditContext) -> TestResult:
        return sanity.emprt(ctx.states, ctx.progress)
