"""Cascading model parameter randomization, from the logits down (the paper's Figure 2)."""

from __future__ import annotations

from .base import register
from .model_randomization import ModelRandomization


@register
class Cascading(ModelRandomization):
    name = "cascading"
    description = (
        "Model parameter randomization, cascading from the logits down: one stage per unit, "
        "earlier randomizations kept; maps compared with the trained model's."
    )
    reference = "Adebayo et al. 2018, Sanity Checks for Saliency Maps, section 3.1 (Figure 2)"
