"""The ``layers`` analysis (the computation: :mod:`..layers`)."""

from __future__ import annotations

from ..layers import layer_analysis
from ..result import TestResult
from ..spec import AuditSpec
from .base import AuditContext, Check, register


@register
class Layers(Check):
    name = "layers"
    kind = "analysis"
    description = (
        "Per-layer heatmaps (Relevance-CAM, Grad-CAM, Grad-CAM++, Score-CAM, LRP relevance at "
        "the layer, and the random-map control) at the output of each block, scored for "
        "faithfulness (Average Drop / Increase, deletion / insertion AUC) and, with masks, "
        "localization (IoU, pointing game); an analysis, with no verdict."
    )
    reference = (
        "Lee et al. 2021, Relevance-CAM, CVPR; Chattopadhay et al. 2018, Grad-CAM++, WACV "
        "(Average Drop / Increase); Petsiuk et al. 2018, RISE, BMVC (deletion / insertion); "
        "Zhang et al. 2018, IJCV (pointing game)"
    )

    def cost(self, spec: AuditSpec, n_units: int) -> float:
        # per layer: four CAM methods and LRP, then 2 x steps forward passes per map
        return 3.0 * n_units

    def run(self, ctx: AuditContext) -> TestResult:
        return layer_analysis(
            ctx.module,
            ctx.images,
            ctx.targets,
            ctx.spec,
            device=ctx.device,
            masks=ctx.masks,
            checks=ctx.map_checks,
            progress=ctx.progress,
        )
