"""Smooth MPRT (the computation: :func:`..sanity.smprt`)."""

from __future__ import annotations

from .. import sanity
from ..result import TestResult
from ..spec import AuditSpec
from .base import AuditContext, Check, register


@register
class SmoothMPRT(Check):
    name = "smprt"
    kind = "test"
    description = (
        "Smooth MPRT: maps averaged over noisy copies of each image (shattered-gradient "
        "noise removed) before the trained and the fully randomized model are compared."
    )
    reference = "Hedstrom et al. 2023, Sanity Checks Revisited, sMPRT (Quantus SmoothMPRT)"

    def cost(self, spec: AuditSpec, n_units: int) -> float:
        return 2.0 * spec.params.smprt_samples  # trained and random model, every noisy copy

    def run(self, ctx: AuditContext) -> TestResult:
        return sanity.smprt(ctx.states, ctx.progress)
