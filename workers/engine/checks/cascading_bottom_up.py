"""Cascading model parameter randomization, from the input up."""

from __future__ import annotations

from .base import register
from .model_randomization import ModelRandomization


@register
class CascadingBottomUp(ModelRandomization):
    name = "cascading_bottom_up"
    description = (
        "Model parameter randomization, cascading from the input up: one stage per unit, "
        "earlier randomizations kept."
    )
    reference = "Adebayo et al. 2018, section 3.1; bottom-up order as in Quantus MPRT"
