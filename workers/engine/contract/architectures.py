"""How a weights file names its architecture: a torchvision name, or ``timm:NAME``.

Torch-free, so the API checks the syntax at upload with the same rule the engine applies; only
a worker with timm installed can tell whether ``NAME`` is a timm model (its submit-time
inspection says so, with :data:`TIMM_MISSING` where timm is absent).
"""

from __future__ import annotations

import re

TIMM_PREFIX = "timm:"
# one sentence wherever timm is needed and absent: the CLI, the Python API, the worker
TIMM_MISSING = "timm is not installed in the worker: pip install 'saliency-audit[timm]'"
# the architecture column holds 100 characters; timm's longest name with its pretrained tag
# (timm 1.0.31: 56) fits with room
MAX_TIMM_NAME = 100 - len(TIMM_PREFIX)
# timm's model names and pretrained tags are lowercase letters, digits and underscores
# (``convnext_atto``, ``resnet18.a1_in1k``); the tag picks the pretrained_cfg (input size, mean
# and std) the weights were trained with
TIMM_NAME = re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)?")
TIMM_NAME_RULE = (
    "a timm model name (lowercase letters, digits and underscores), optionally followed by "
    "'.' and a pretrained tag, e.g. timm:resnet18 or timm:resnet18.a1_in1k"
)


def timm_model_name(architecture: str) -> str | None:
    """``NAME`` of ``timm:NAME``; None when ``architecture`` does not name a timm model."""
    if not architecture.startswith(TIMM_PREFIX):
        return None
    return architecture[len(TIMM_PREFIX) :]


def timm_name_problem(name: str) -> str | None:
    """Why ``name`` (after ``timm:``) cannot be a timm model name; None when it can."""
    if len(name) > MAX_TIMM_NAME:
        return f"a timm model name has at most {MAX_TIMM_NAME} characters"
    if not TIMM_NAME.fullmatch(name):
        return f"not {TIMM_NAME_RULE}"
    return None
