"""Sanity checks and analyses. Importing this package registers every check."""

from .base import CHECKS, AuditContext, Check, CheckKind, check_info, register

# Each module registers its check on import (order = order in listings and the catalogue).
from . import cascading as _cascading  # noqa: F401  isort: skip
from . import cascading_bottom_up as _cascading_bottom_up  # noqa: F401  isort: skip
from . import independent as _independent  # noqa: F401  isort: skip
from . import data_randomization as _data_randomization  # noqa: F401  isort: skip
from . import smprt as _smprt  # noqa: F401  isort: skip
from . import emprt as _emprt  # noqa: F401  isort: skip
from . import random_logit as _random_logit  # noqa: F401  isort: skip
from . import layers as _layers  # noqa: F401  isort: skip

__all__ = ["CHECKS", "AuditContext", "Check", "CheckKind", "check_info", "register"]
