"""The Flask application factory: ``create_app(config)``.

Nothing is global at import time: the factory builds the database pool, the artifact store and
the enqueuer from one :class:`~saliency_audit.service.config.Config` and keeps them in
``app.extensions``.
A production server runs ``gunicorn 'saliency_audit.service.app:create_app()'``; ``saliency-audit
serve``
runs the same app embedded.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from flask import Flask, current_app, g, request

from .artifacts import ArtifactStore
from .config import Config
from .db import Database
from .jobs import Enqueuer, broker_probe, reconcile
from .quotas import RateLimiter

log = logging.getLogger(__name__)
# The HTML the service serves (the report and /docs) is self-contained: inline CSS, data: URI
# pictures, inline SVG, no script, no form, nothing fetched.
HTML_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)


@dataclass
class State:
    config: Config
    db: Database
    store: ArtifactStore
    enqueue: Enqueuer

    def reconcile_once(self) -> dict[str, list[str]]:
        return reconcile(self.db, self.enqueue, broker_probe(self.config)).to_dict()


def state() -> State:
    value: State = current_app.extensions["saliency_audit"]
    return value


def create_app(config: Config | None = None, *, celery_app: Any | None = None) -> Flask:
    config = config or Config.from_env()
    app = Flask("saliency_audit")
    app.config["MAX_CONTENT_LENGTH"] = config.max_request_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    st = State(
        config=config,
        db=Database.from_config(config),
        store=ArtifactStore(config.resolved_artifact_dir),
        enqueue=Enqueuer(config, celery_app),
    )
    app.extensions["saliency_audit"] = st

    from .api import audits, datasets, meta, metrics, models
    from .problems import register_error_handlers

    register_error_handlers(app)
    for blueprint in (meta.bp, metrics.bp, models.bp, datasets.bp, audits.bp):
        app.register_blueprint(blueprint)

    @app.before_request
    def _bound_body() -> None:
        bound_body(config.max_json_bytes)

    @app.before_request
    def _check_parameters() -> None:
        # before authentication: a NUL byte or an id past the column's range never reaches
        # the database, whose answer to them would be a 500
        if request.path.startswith("/v1/") and request.endpoint is not None:
            from .api.common import check_request_parameters

            check_request_parameters()

    @app.before_request
    def _authenticate() -> None:
        # a CORS preflight (OPTIONS) carries no credentials
        if (
            request.path.startswith("/v1/")
            and request.endpoint is not None
            and request.method != "OPTIONS"
        ):
            from .auth import require_tenant

            with st.db.session() as session:
                require_tenant(session)

    limiter = RateLimiter(config)
    app.extensions["saliency_audit_rate_limiter"] = limiter

    @app.before_request
    def _rate_limit() -> None:
        # after authentication: the bucket is the tenant's (an unauthenticated request was
        # refused already)
        tenant = getattr(g, "tenant_id", None)
        if tenant is not None and request.method != "OPTIONS":
            limiter.check(tenant)

    @app.after_request
    def _headers(response: Any) -> Any:
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if response.mimetype == "text/html":
            response.headers.setdefault("Content-Security-Policy", HTML_CSP)
        if getattr(g, "tenant_id", None):
            response.headers.setdefault("Vary", "Authorization")
        return response

    if config.run_reconciler_in_api:
        start_reconciler(st)
    return app


def bound_body(max_bytes: int) -> None:
    """Hold every request body but a multipart upload to ``max_bytes``, before it is parsed.

    JSON bodies do not share the uploads' limit (``max_request_bytes``): a declared
    Content-Length above the limit is a 413 before a byte is read; a chunked body (no
    Content-Length) is read through werkzeug's stream capped at ``max_bytes + 1`` and is a 413
    when it fills it, so the API never buffers more than that of a JSON body.
    """
    if request.mimetype == "multipart/form-data":
        return
    request.max_content_length = max_bytes + 1
    size = request.content_length
    if size is None and "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        # cached: get_json() parses these bytes without reading again
        size = len(request.get_data(cache=True))
    if size is not None and size > max_bytes:
        from .problems import ApiError

        declared = "" if request.content_length is None else f" ({size} bytes)"
        raise ApiError(
            413,
            "body_too_large",
            f"the request body{declared} is over the limit: JSON bodies are limited to "
            f"{max_bytes} bytes (uploads use multipart/form-data)",
            limit_bytes=max_bytes,
        )


def start_reconciler(st: State) -> threading.Thread:
    """A daemon thread that reconciles every ``reconcile_interval_s`` (embedded mode; in
    production ``saliency-audit reconcile`` runs as its own process)."""
    stop = threading.Event()

    def loop() -> None:
        while True:
            try:
                st.reconcile_once()
            except Exception as exc:  # a database or broker blip: try again next round
                log.warning("reconciler pass failed: %s", exc)
            if stop.wait(st.config.reconcile_interval_s):
                return

    thread = threading.Thread(target=loop, name="reconciler", daemon=True)
    thread.start()
    return thread
