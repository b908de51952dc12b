"""What every blueprint shares: the tenant's lookups, pagination, request bodies, uploads."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, TypeVar

from flask import Response, g, jsonify, request, url_for
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from werkzeug.datastructures import FileStorage

from ..app import state
from ..artifacts import Received, TooLarge
from ..models import Base
from ..problems import ApiError

T = TypeVar("T", bound=Base)
DEFAULT_PAGE = 50


def tenant_id() -> str:
    value: str = g.tenant_id
    return value


def get_owned(session: Session, model: type[T], resource_id: str, what: str) -> T:
    """The tenant's row, or 404: another tenant's id is indistinguishable from a missing one."""
    row = session.get(model, resource_id)
    if (
        row is None
        or getattr(row, "tenant_id", None) != tenant_id()
        or getattr(row, "deleted_at", None) is not None
    ):
        raise ApiError(404, "not_found", f"no {what} with id {resource_id!r}")
    return row


def iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def page_args() -> tuple[int, int]:
    try:
        limit = int(request.args.get("limit", DEFAULT_PAGE))
        offset = int(request.args.get("offset", 0))
    except ValueError:
        raise ApiError(400, "invalid_pagination", "limit and offset must be integers") from None
    maximum = state().config.page_size_max
    if not 1 <= limit <= maximum or offset < 0:
        raise ApiError(
            400, "invalid_pagination", f"limit must be in [1, {maximum}] and offset >= 0"
        )
    return limit, offset


def paginated(
    session: Session, query: Any, render: Any, endpoint: str, **params: Any
) -> dict[str, Any]:
    """``{"items", "total", "limit", "offset", "next"}`` for a select ordered newest first."""
    limit, offset = page_args()
    total = session.scalar(select(func.count()).select_from(query.order_by(None).subquery()))
    rows = session.scalars(query.limit(limit).offset(offset)).all()
    has_more = offset + len(rows) < (total or 0)
    kept = {k: v for k, v in params.items() if v is not None}
    return {
        "items": [render(r) for r in rows],
        "total": total,
        "limit": limit,
        "offset": offset,
        "next": url_for(endpoint, limit=limit, offset=offset + limit, **kept) if has_more else None,
    }


def json_body() -> dict[str, Any]:
    if not request.is_json:
        raise ApiError(
            415, "unsupported_media_type", "send a JSON body (Content-Type: application/json)"
        )
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    return body


def metadata_part() -> dict[str, Any]:
    """The optional JSON part ``metadata`` of a multipart upload (a form field or a file)."""
    raw: str | None = request.form.get("metadata")
    if raw is None and "metadata" in request.files:
        raw = request.files["metadata"].read(1024 * 1024 + 1).decode("utf-8", "replace")
    if raw is None or not raw.strip():
        return {}
    if len(raw) > 1024 * 1024:
        raise ApiError(413, "metadata_too_large", "the metadata part is limited to 1 MiB")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ApiError(400, "invalid_metadata", f"the metadata part is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError(400, "invalid_metadata", "the metadata part must be a JSON object")
    return value


def file_part() -> FileStorage:
    upload = request.files.get("file")
    if upload is None:
        raise ApiError(
            400, "missing_file", "send the file as the multipart/form-data part named 'file'"
        )
    return upload


def receive_upload(upload: FileStorage, max_bytes: int) -> Received:
    """Copy the spooled upload into the store's temporary folder, hashing it."""
    try:
        received = state().store.receive(upload.stream, max_bytes)  # type: ignore[arg-type]
    except TooLarge as exc:
        raise ApiError(
            413, "payload_too_large", f"the file is {exc}", limit_bytes=exc.limit
        ) from None
    if received.size == 0:
        state().store.discard(received)
        raise ApiError(422, "empty_file", "the uploaded file is empty")
    return received


def existing_upload(session: Session, model: type[T], sha256: str) -> T | None:
    """The tenant's live row for these bytes (a model or dataset), if any."""
    row = session.scalars(
        select(model).where(
            model.tenant_id == tenant_id(),  # type: ignore[attr-defined]
            model.sha256 == sha256,  # type: ignore[attr-defined]
            model.deleted_at.is_(None),  # type: ignore[attr-defined]
        )
    ).one_or_none()
    return row


def upload_response(body: dict[str, Any], status: int) -> tuple[Response, int]:
    """201 with a new row, or 200 with the row that already holds the uploaded bytes."""
    response = jsonify(body)
    response.headers["Location"] = body["links"]["self"]
    return response, status


def race_winner(model: type[T], sha256: str, render: Any) -> tuple[Response, int]:
    """After an IntegrityError on upload: the same bytes arrived in a concurrent request,
    which created the row; answer with it (re-raise if there is none after all)."""
    with state().db.session() as session:
        winner = existing_upload(session, model, sha256)
        if winner is None:
            raise
        return upload_response(render(winner), 200)


def live_rows(model: type[T]) -> Any:
    """The tenant's rows that are not deleted, newest first (for the list endpoints)."""
    return (
        select(model)
        .where(
            model.tenant_id == tenant_id(),  # type: ignore[attr-defined]
            model.deleted_at.is_(None),  # type: ignore[attr-defined]
        )
        .order_by(model.created_at.desc(), model.id)  # type: ignore[attr-defined]
    )


def check_keys(body: dict[str, Any], allowed: set[str], what: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(
            422, "unknown_fields", f"unknown {what} fields {unknown}; allowed: {sorted(allowed)}"
        )
