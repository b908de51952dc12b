"""The data randomization test (the computation: :mod:`..data_randomization`)."""

from __future__ import annotations

from ..data_randomization import data_randomization
from ..result import TestResult
from ..spec import AuditSpec
from .base import AuditContext, Check, register


@register
class DataRandomization(Check):
    name = "data_randomization"
    kind = "test"
    description = (
        "The architecture trained on permuted labels until it memorizes them, compared with "
        "a copy trained on the true labels with the same recipe, on the audit images."
    )
    reference = "Adebayo et al. 2018, section 3.2"
    needs_training_data = True

    def cost(self, spec: AuditSpec, n_units: int) -> float:
        return 20.0  # training dominates; it depends on the data

    def run(self, ctx: AuditContext) -> TestResult:
        inputs = ctx.inputs
        return data_randomization(
            inputs.module,
            inputs.images,
            inputs.targets,
            inputs.names,
            inputs.spec,
            inputs.layer,
            device=inputs.device,
            baseline=inputs.baseline,
            num_classes=ctx.num_classes,
            train=ctx.train,
            random_label_model=ctx.random_label_model,
            checks=ctx.map_checks,
            progress=ctx.progress,
        )
