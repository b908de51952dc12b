"""The audit engine: pure compute on tensors, usable as a library and from the CLI.

It imports nothing from Flask, Celery, SQLAlchemy or ``service``; its only inputs are what its
caller hands it (model bytes, decoded images, a spec) and its only output is an ``AuditResult``.

The public Python API (:mod:`.api`) is importable from here, loaded on first use so that
importing the package stays torch-free: ``from saliency_audit.workers.engine import audit,
Explainer``.
"""

from typing import Any

_PUBLIC = {
    "audit": ".api",
    "read_images": ".api",
    "load_model_input": ".api",
    "AuditImages": ".api",
    "AuditResult": ".result",
    "Explainer": ".methods.plugins",
    "register_explainer": ".methods.plugins",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        from importlib import import_module

        return getattr(import_module(_PUBLIC[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
