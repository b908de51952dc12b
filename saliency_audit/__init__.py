"""saliency-audit: does your saliency method depend on what your image classifier learned?

The installed import names live under this one package, so installing saliency-audit adds no
top-level ``service``, ``workers`` or ``migrations`` module to your environment:

- :mod:`saliency_audit.service`: the HTTP API, the CLI (``saliency-audit``), the client and the
gate;
- :mod:`saliency_audit.workers`: the Celery worker (``celery -A saliency_audit.workers worker``),
the
  audit engine (:mod:`saliency_audit.workers.engine`) and the reports;
- :mod:`saliency_audit.migrations`: the database migrations.

The Python API is importable from here and loaded on first use, so ``import saliency_audit`` stays
torch-free (the client-only install has no torch)::

    from saliency_audit import audit

    result = audit(model, "photos/", methods=["gradient", "gradcam"])
    result.write("out")  # report.json and maps.npz, as `saliency-audit run` writes them

In the repository, ``service/``, ``workers/`` and ``migrations/`` are the top-level folders; this
package's entries of the same names link to them.
"""

from importlib import metadata as _metadata
from typing import Any

_PUBLIC = {
    "audit": "saliency_audit.workers.engine.api",
    "read_images": "saliency_audit.workers.engine.api",
    "load_model_input": "saliency_audit.workers.engine.api",
    "AuditImages": "saliency_audit.workers.engine.api",
    "DEFAULT_TESTS": "saliency_audit.workers.engine.api",
    "AuditResult": "saliency_audit.workers.engine.result",
    "Explainer": "saliency_audit.workers.engine.methods.plugins",
    "register_explainer": "saliency_audit.workers.engine.methods.plugins",
}
__all__ = sorted([*_PUBLIC, "__version__"])

try:
    __version__ = _metadata.version("saliency-audit")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        from importlib import import_module

        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
