"""Independent model parameter randomization: one unit at a time."""

from __future__ import annotations

from .base import register
from .model_randomization import ModelRandomization


@register
class Independent(ModelRandomization):
    name = "independent"
    description = "Model parameter randomization of one unit at a time, all others trained."
    reference = "Adebayo et al. 2018, section 3.1 (independent randomization)"
