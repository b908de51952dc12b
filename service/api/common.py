"""What every blueprint shares: the tenant's lookups, pagination, request bodies, uploads."""

from __future__ import annotations

import json
import re
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
from ..uploads.common import unsafe_name_character

T = TypeVar("T", bound=Base)
DEFAULT_PAGE = 50
# PostgreSQL's bigint (LIMIT/OFFSET and the BigInteger columns) and integer (the autoincrement
# ids a path can name, such as a heatmap's) hold no more than these.
BIGINT_MAX = 2**63 - 1
INTEGER_MAX = 2**31 - 1
# how deep a JSON body or metadata part may nest (an audit request needs about 6)
JSON_MAX_DEPTH = 32
# NUL and the other C0 controls, DEL, and lone surrogates: never meaningful in an id, a filter
# or a field, and PostgreSQL refuses NUL and unpaired surrogates outright. JSON strings may keep
# tab, line feed and carriage return.
_CONTROL_IN_PARAMETER = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
_CONTROL_IN_JSON = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def refuse_control_characters(value: str, where: str, *, in_json: bool = False) -> None:
    pattern = _CONTROL_IN_JSON if in_json else _CONTROL_IN_PARAMETER
    if (found := pattern.search(value)) is not None:
        raise ApiError(
            400,
            "invalid_characters",
            f"{where} contains the control character U+{ord(found.group()):04X}; "
            "NUL, control characters and unpaired surrogates are refused",
        )


def check_request_parameters() -> None:
    """Path and query parameters at the edge: no control characters, and an integer path
    parameter (a row id) within the database column's range. Runs before every /v1/ view."""
    for name, value in (request.view_args or {}).items():
        if isinstance(value, str):
            refuse_control_characters(value, f"the path parameter {name}")
        elif isinstance(value, int) and not 0 <= value <= INTEGER_MAX:
            raise ApiError(
                400, "out_of_range", f"the path parameter {name} must be in [0, {INTEGER_MAX}]"
            )
    for name, value in request.args.items(multi=True):
        refuse_control_characters(name, "a query parameter name")
        refuse_control_characters(value, f"the query parameter {name}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ApiError(400, "duplicate_key", f"the key {key[:100]!r} appears twice")
        out[key] = value
    return out


def _check_json_value(value: Any, where: str) -> None:
    """Depth and characters of a parsed JSON value, iteratively (no recursion to exhaust)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            refuse_control_characters(node, f"a string in {where}", in_json=True)
            continue
        if not isinstance(node, dict | list):
            continue
        if depth > JSON_MAX_DEPTH:
            raise ApiError(400, "too_deep", f"{where} nests deeper than {JSON_MAX_DEPTH} levels")
        if isinstance(node, dict):
            for key in node:
                refuse_control_characters(key, f"a key in {where}", in_json=True)
            stack.extend((v, depth + 1) for v in node.values())
        else:
            stack.extend((v, depth + 1) for v in node)


def strict_json(raw: str | bytes, where: str, invalid_code: str) -> Any:
    """Parse JSON as the API accepts it: no duplicate keys, at most ``JSON_MAX_DEPTH`` levels,
    no control characters in keys or strings; anything else is a 400 ``invalid_code``."""
    try:
        value = json.loads(raw, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ApiError(
            400, "too_deep", f"{where} nests deeper than {JSON_MAX_DEPTH} levels"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, invalid_code, f"{where} is not JSON: {exc}") from None
    _check_json_value(value, where)
    return value


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
    # offset + limit (the next page's offset) must still fit the database's bigint
    offset_max = BIGINT_MAX - maximum
    if not 1 <= limit <= maximum or not 0 <= offset <= offset_max:
        raise ApiError(
            400,
            "invalid_pagination",
            f"limit must be in [1, {maximum}] and offset in [0, {offset_max}]",
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
    body = strict_json(request.get_data(cache=True), "the body", "invalid_json")
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    return body


def metadata_part() -> dict[str, Any]:
    """The optional JSON part ``metadata`` of a multipart upload (a form field or a file)."""
    refuse_duplicate_parts("metadata")
    raw: str | None = request.form.get("metadata")
    if raw is None and "metadata" in request.files:
        raw = request.files["metadata"].read(1024 * 1024 + 1).decode("utf-8", "replace")
    if raw is None or not raw.strip():
        return {}
    if len(raw) > 1024 * 1024:
        raise ApiError(413, "metadata_too_large", "the metadata part is limited to 1 MiB")
    value = strict_json(raw, "the metadata part", "invalid_metadata")
    if not isinstance(value, dict):
        raise ApiError(400, "invalid_metadata", "the metadata part must be a JSON object")
    return value


def checked_name(name: str, where: str) -> str:
    """A file or display name as given, or 422 ``invalid_name`` if it holds a control or
    bidirectional-formatting character (see :func:`unsafe_name_character`)."""
    if (bad := unsafe_name_character(name)) is not None:
        raise ApiError(
            422,
            "invalid_name",
            f"{where} contains {bad}; names may not hold control or bidirectional-formatting "
            "characters",
        )
    return name


def refuse_duplicate_parts(*names: str) -> None:
    """A multipart field sent twice (as form fields, files or both) is refused, not resolved."""
    for name in names:
        if len(request.form.getlist(name)) + len(request.files.getlist(name)) > 1:
            raise ApiError(400, "duplicate_part", f"the multipart part {name!r} appears twice")


def file_part() -> FileStorage:
    refuse_duplicate_parts("file", "metadata")
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
