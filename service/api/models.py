"""``/v1/models``: upload, list, fetch and delete classifiers.

An upload is streamed to disk, checked without executing anything (``onnx.checker`` and no
external data for ONNX, a parsed header for safetensors, a static scan of the pickle opcodes for
``torch.save`` zips: :mod:`saliency_audit.service.uploads`) and stored once per tenant by sha256:
uploading the
same bytes again answers 200 with the existing model.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from flask import Blueprint, jsonify, request, url_for
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from saliency_audit.workers.engine.errors import SpecError
from saliency_audit.workers.engine.spec import InputSpec

from .. import purge
from ..app import state
from ..models import Audit, ModelRecord, utcnow
from ..problems import ApiError
from ..quotas import check_stored_bytes
from ..uploads import inspect_model
from .common import (
    check_keys,
    checked_name,
    file_part,
    get_owned,
    iso,
    live_rows,
    metadata_part,
    paginated,
    race_winner,
    receive_upload,
    tenant_id,
    upload_response,
)

bp = Blueprint("models", __name__, url_prefix="/v1/models")
METADATA_KEYS = {"name", "architecture", "input_spec", "class_names"}


def render(row: ModelRecord) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "format": row.format,
        "architecture": row.architecture,
        "sha256": row.sha256,
        "size_bytes": row.size_bytes,
        "input_spec": row.input_spec,
        "class_names": row.class_names,
        "details": row.details,
        "created_at": iso(row.created_at),
        "links": {
            "self": url_for("models.get_model", model_id=row.id),
            "audits": url_for("audits.list_audits", model_id=row.id),
        },
    }


def _input_spec_overrides(meta: dict[str, Any]) -> dict[str, Any]:
    overrides = meta.get("input_spec") or {}
    if not isinstance(overrides, dict):
        raise ApiError(422, "invalid_metadata", "metadata.input_spec must be a JSON object")
    overrides = dict(overrides)
    class_names = meta.get("class_names")
    if class_names is not None:
        if not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names):
            raise ApiError(
                422, "invalid_metadata", "metadata.class_names must be a list of strings"
            )
        overrides["class_names"] = class_names
    try:
        # validated against the engine's own rules (every field, with the defaults filled in)
        InputSpec.from_dict({**InputSpec().to_dict(), **overrides})
    except (SpecError, TypeError, ValueError) as exc:
        raise ApiError(422, "invalid_input_spec", f"metadata.input_spec: {exc}") from None
    return overrides


def check_storage(session: Any, size_bytes: int) -> None:
    """507 ``storage_quota_exceeded`` when this model would take the tenant past its
    stored-bytes limit (:mod:`saliency_audit.service.quotas`)."""
    check_stored_bytes(session, state().config, tenant_id(), size_bytes)


@bp.post("")
def upload_model() -> Any:
    st = state()
    upload = file_part()
    meta = metadata_part()
    check_keys(meta, METADATA_KEYS, "model metadata")
    architecture = meta.get("architecture")
    if architecture is not None and not isinstance(architecture, str):
        raise ApiError(422, "invalid_metadata", "metadata.architecture must be a string")
    overrides = _input_spec_overrides(meta)
    filename = checked_name(upload.filename or "model", "the file name")
    name = checked_name(str(meta.get("name") or filename)[:300], "metadata.name")
    received = receive_upload(upload, st.config.max_model_bytes)
    try:
        info = inspect_model(
            received.path,
            filename,
            architecture=architecture,
            max_bytes=st.config.max_model_bytes,
            output=overrides.get("output"),
            input_spec=overrides,
        )
        if info.format != "onnx" and overrides.get("output") is not None:
            raise ApiError(
                422,
                "invalid_input_spec",
                "metadata.input_spec.output names an ONNX graph output; a weights file has "
                "its architecture's one output",
            )
        if info.format == "onnx" and architecture is not None:
            raise ApiError(
                422,
                "architecture_not_used",
                "metadata.architecture applies to weights files (safetensors, torch.save); "
                "an ONNX file carries its own graph",
            )
        try:
            with st.db.session() as session:
                existing = session.scalars(
                    select(ModelRecord).where(
                        ModelRecord.tenant_id == tenant_id(),
                        ModelRecord.sha256 == received.sha256,
                        ModelRecord.deleted_at.is_(None),  # a tombstone is never revived
                    )
                ).one_or_none()
                if existing is not None and existing.deleted_at is None:
                    if "load_problem" in (existing.details or {}):
                        # the same file again: inspected again, so a worker fixed since (timm
                        # installed) clears the problem that refuses its audits
                        st.enqueue.inspect_model(existing.id)
                    return upload_response(render(existing), 200)
                check_storage(session, received.size)
                row = existing or ModelRecord(tenant_id=tenant_id(), sha256=received.sha256)
                row.name = name
                row.format = info.format
                row.architecture = architecture if info.format != "onnx" else None
                row.size_bytes = received.size
                row.input_spec = overrides
                row.class_names = overrides.get("class_names")
                row.details = asdict(info)
                row.created_at = utcnow()
                row.deleted_at = None
                session.add(row)
                session.flush()
                body = render(row)
                # the file enters the store only once its row is accepted: a refusal or a
                # database error above leaves nothing behind
                st.store.commit(received)
        except IntegrityError:
            return race_winner(ModelRecord, received.sha256, render)
    finally:
        st.store.discard(received)  # no-op once committed
    # committed: a CPU worker lists its layer names for the submit check (best effort)
    st.enqueue.inspect_model(body["id"])
    return upload_response(body, 201)


@bp.get("")
def list_models() -> Any:
    with state().db.session() as session:
        query = live_rows(ModelRecord)
        return jsonify(paginated(session, query, render, "models.list_models"))


@bp.get("/<model_id>")
def get_model(model_id: str) -> Any:
    with state().db.session() as session:
        return jsonify(render(get_owned(session, ModelRecord, model_id, "model")))


def cascade_arg() -> bool:
    """``?cascade=true``: delete the finished audits that used the model or dataset too."""
    value = request.args.get("cascade", "false").lower()
    if value not in ("true", "false"):
        raise ApiError(400, "invalid_parameter", "cascade must be 'true' or 'false'")
    return value == "true"


@bp.delete("/<model_id>")
def delete_model(model_id: str) -> Any:
    """Delete the model and, unless another live model (of any tenant) holds the same bytes,
    its file. Refused while an audit of it is queued or running. Finished audits of it keep
    their reports and the model as a tombstone (metadata kept, file gone), unless
    ``?cascade=true`` deletes them too (:mod:`saliency_audit.service.purge`)."""
    st = state()
    cascade = cascade_arg()
    with st.db.session() as session:
        row = get_owned(session, ModelRecord, model_id, "model")
        active = session.scalars(
            select(Audit.id).where(Audit.model_id == row.id, Audit.state.in_(("queued", "running")))
        ).all()
        if active:
            raise ApiError(
                409,
                "model_in_use",
                f"{len(active)} audits of this model are queued or running; cancel them first",
                audits=list(active),
            )
        files = purge.delete_upload(session, row, cascade, purge.Deleted())
    purge.remove_unreferenced(st.db, st.store, files)
    return "", 204


@bp.get("/<model_id>/audits")
def model_history(model_id: str) -> Any:
    """The model's audits, newest first (paginated), the verdict trend per method over its
    succeeded audits (oldest to newest), and what changed between the last two."""
    from ..models import VerdictRow
    from .audits import render as render_audit

    with state().db.session() as session:
        row = get_owned(session, ModelRecord, model_id, "model")
        query = (
            select(Audit)
            .where(Audit.tenant_id == tenant_id(), Audit.model_id == row.id)
            .order_by(Audit.created_at.desc(), Audit.id)
        )
        page = paginated(session, query, render_audit, "models.model_history", model_id=row.id)
        succeeded = session.scalars(
            select(Audit)
            .where(
                Audit.tenant_id == tenant_id(),
                Audit.model_id == row.id,
                Audit.state == "succeeded",
            )
            .order_by(Audit.finished_at, Audit.id)
        ).all()
        trend: dict[str, list[dict[str, Any]]] = {}
        for audit in succeeded:
            for method, by_test in (audit.verdict_summary or {}).items():
                trend.setdefault(method, []).append(
                    {
                        "audit_id": audit.id,
                        "finished_at": iso(audit.finished_at),
                        "verdicts": by_test,
                    }
                )
        comparison = None
        if len(succeeded) >= 2:
            previous, latest = succeeded[-2], succeeded[-1]
            rows = session.scalars(
                select(VerdictRow).where(VerdictRow.audit_id.in_([previous.id, latest.id]))
            ).all()
            by_audit: dict[str, dict[tuple[str, str], Any]] = {previous.id: {}, latest.id: {}}
            for v in rows:
                by_audit[v.audit_id][(v.method, v.test)] = v
            changes = []
            for key in sorted(set(by_audit[previous.id]) | set(by_audit[latest.id])):
                before, after = by_audit[previous.id].get(key), by_audit[latest.id].get(key)
                changes.append(
                    {
                        "method": key[0],
                        "test": key[1],
                        "previous": before.verdict if before else None,
                        "latest": after.verdict if after else None,
                        "changed": (before.verdict if before else None)
                        != (after.verdict if after else None),
                        "previous_mean": before.mean if before else None,
                        "latest_mean": after.mean if after else None,
                    }
                )
            comparison = {
                "previous_audit_id": previous.id,
                "latest_audit_id": latest.id,
                "changes": changes,
            }
    return jsonify({**page, "trend": trend, "comparison": comparison})
