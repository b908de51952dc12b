"""RFC 9457 problem details: every error the API returns, in one place.

Handlers turn :class:`ApiError`, upload rejections, engine spec errors, Werkzeug's HTTP errors
(404, 405, 413, ...), an unreachable database (503) and anything unexpected (500) into
``application/problem+json``. Nothing else in the service builds an error response.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, json, request
from sqlalchemy.exc import InterfaceError, OperationalError
from werkzeug.exceptions import HTTPException

from saliency_audit.workers.engine.errors import EngineError

from .uploads import UploadRejected

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://saliency-audit.dev/problems/"
log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the API reports on purpose: ``status``, a short ``code`` and a ``detail``."""

    def __init__(
        self, status: int, code: str, detail: str, retry_after_s: int | None = None, **extra: Any
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.retry_after_s = retry_after_s
        self.extra = extra


def problem(
    status: int, code: str, detail: str, title: str | None = None, **extra: Any
) -> Response:
    from werkzeug.http import HTTP_STATUS_CODES

    body = {
        "type": TYPE_BASE + code,
        "title": title or HTTP_STATUS_CODES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "code": code,
        "instance": request.path if request else None,
        **extra,
    }
    response = Response(json.dumps(body), status=status, mimetype=PROBLEM_JSON)
    if status == 503:
        response.headers["Retry-After"] = "5"
    elif status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="saliency-audit"'
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        response = problem(exc.status, exc.code, exc.detail, **exc.extra)
        if exc.retry_after_s is not None:
            response.headers["Retry-After"] = str(exc.retry_after_s)
        return response

    @app.errorhandler(UploadRejected)
    def _upload(exc: UploadRejected) -> Response:
        return problem(exc.status, exc.code, exc.detail, **exc.extra)

    @app.errorhandler(EngineError)
    def _engine(exc: EngineError) -> Response:
        details: dict[str, Any] = {
            k: v for k, v in exc.details.items() if _jsonable(v) and k != "title"
        }
        return problem(422, exc.code, exc.message, **details)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = {
            404: "not_found",
            405: "method_not_allowed",
            413: "payload_too_large",
            400: "bad_request",
            415: "unsupported_media_type",
        }.get(status, "http_error")
        detail = exc.description or ""
        if status == 404:
            detail = f"no resource at {request.path}"
        response = problem(status, code, detail)
        if status == 405 and exc.get_response().headers.get("Allow"):
            response.headers["Allow"] = exc.get_response().headers["Allow"]
        return response

    @app.errorhandler(OperationalError)
    @app.errorhandler(InterfaceError)
    def _database(exc: Exception) -> Response:
        log.warning("database unavailable: %s", exc)
        return problem(503, "database_unavailable", "the database is unreachable; retry shortly")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return problem(500, "internal_error", "an unexpected error occurred; it has been logged")


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
