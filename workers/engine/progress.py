"""How the engine reports progress: one callback type for every long step."""

from __future__ import annotations

from collections.abc import Callable

# (fraction done in [0, 1], what is being done) -> None; a step's callback receives its own
# 0..1 and the caller maps it into its share of the whole audit
ProgressCallback = Callable[[float, str], None]


def no_progress(fraction: float, step: str) -> None:
    """The callback of a caller that does not follow progress."""
