"""Discovery and health: ``/v1/methods``, ``/openapi.json``, ``/docs``, ``/healthz``,
``/readyz``."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from saliency_audit.workers.engine.catalogue import catalogue
from saliency_audit.workers.engine.policy import default_document

from ..app import state
from ..jobs import broker_ping
from ..problems import problem

bp = Blueprint("meta", __name__)


@bp.get("/healthz")
def healthz() -> Any:
    """The process is up (no dependency is checked: a liveness probe)."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> Any:
    """The database and the broker are reachable (a readiness probe)."""
    st = state()
    checks: dict[str, str] = {}
    for name, check in (("database", st.db.ping), ("broker", lambda: broker_ping(st.config))):
        try:
            check()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"unreachable: {type(exc).__name__}"
    if all(v == "ok" for v in checks.values()):
        return jsonify(status="ready", checks=checks)
    return problem(503, "not_ready", "a dependency is unreachable", checks=checks)


@bp.get("/v1/methods")
def methods() -> Any:
    """Every saliency method, test and similarity measure, and the default verdict policy."""
    cat = catalogue()
    return jsonify(
        methods=cat["methods"],
        tests=cat["tests"],
        measures=cat["measures"],
        default_policy=default_document(),
    )


@bp.get("/openapi.json")
def openapi() -> Any:
    from ..openapi import openapi_document

    return jsonify(openapi_document())


@bp.get("/docs")
def docs() -> Response:
    from ..openapi import docs_html

    return Response(docs_html(), mimetype="text/html")


@bp.get("/v1/schemas/report.json")
def report_schema() -> Any:
    """The JSON Schema (2020-12) of report.json, versioned with the report's schema_version."""
    from saliency_audit.workers.reports.schema import report_schema as schema

    response = jsonify(schema())
    response.headers["Content-Type"] = "application/schema+json"
    response.headers["Cache-Control"] = "public, max-age=3600"
    return response
