"""Saliency methods. Importing this package registers every family."""

from .base import (
    FAMILIES,
    METHODS,
    LayerChoice,
    MethodContext,
    MethodFamily,
    MethodInfo,
    MethodOutcome,
    cam_layer_choice,
    compute_methods,
    method_info,
    resolve_layer,
)

# Each module registers its families on import (order = order in listings).
from . import gradients as _gradients  # noqa: F401  isort: skip
from . import noise as _noise  # noqa: F401  isort: skip
from . import integrated as _integrated  # noqa: F401  isort: skip
from . import guided as _guided  # noqa: F401  isort: skip
from . import scorecam as _scorecam  # noqa: F401  isort: skip
from . import lrp as _lrp  # noqa: F401  isort: skip
from . import controls as _controls  # noqa: F401  isort: skip

__all__ = [
    "FAMILIES",
    "METHODS",
    "LayerChoice",
    "MethodContext",
    "MethodFamily",
    "MethodInfo",
    "MethodOutcome",
    "cam_layer_choice",
    "compute_methods",
    "method_info",
    "resolve_layer",
]
