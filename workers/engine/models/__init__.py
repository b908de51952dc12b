"""Model adapters: every model becomes a ``LoadedModel`` (an NCHW torch module + its input spec)."""

from .base import LoadedModel

__all__ = ["LoadedModel"]
