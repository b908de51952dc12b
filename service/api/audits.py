"""``/v1/audits``: submit, follow, cancel, and fetch results.

``POST`` validates the request against the engine's own rules (methods, tests, measures,
policy: all torch-free), writes the audit row, commits, and only then enqueues (the
job-lifecycle rule of ARCHITECTURE.md); it answers 202 with ``Location`` and ``Retry-After``.
An ``Idempotency-Key`` makes a retried submission safe: the same key with the same body gives
the same audit, the same key with another body is a 422.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from flask import Blueprint, Response, jsonify, request, send_file, url_for
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from saliency_audit.workers.engine.catalogue import catalogue, check_methods
from saliency_audit.workers.engine.contract.cost import (
    PassPrices,
    estimate,
    eta_seconds,
    families_of,
    predict,
    stages_of,
)
from saliency_audit.workers.engine.contract.report import PICTURE_KINDS
from saliency_audit.workers.engine.contract.verdicts import Verdict
from saliency_audit.workers.engine.errors import (
    SpecError,
    unknown_analysis_layer,
    unknown_cam_layer,
)
from saliency_audit.workers.engine.policy import load_policy, rule_stages
from saliency_audit.workers.engine.spec import MEASURES, AuditSpec, expand_tests

from .. import purge, routes
from ..app import state
from ..artifacts import ArtifactMissing
from ..config import Config
from ..jobs import announce_finished
from ..models import (
    AUDIT_STATES,
    FINAL_STATES,
    Audit,
    AuditArtifact,
    DatasetRecord,
    ModelRecord,
    ResultRow,
    Tenant,
    VerdictRow,
    utcnow,
)
from ..problems import ApiError
from ..quotas import check_queued_audits
from ..webhooks import WebhookUrlError, check_url, new_secret
from .common import check_keys, get_owned, iso, json_body, paginated, tenant_id

bp = Blueprint("audits", __name__, url_prefix=routes.AUDITS_PREFIX)

BODY_KEYS = {
    "model_id",
    "stages",
    "dataset_id",
    "train_dataset_id",
    "methods",
    "tests",
    "layer",
    "layers",
    "policy",
    "seed",
    "granularity",
    "measures",
    "params",
    "training",
    "batch_size",
    "adaptive",
    "webhook_url",
}
RETRY_AFTER_S = 2
# a verdict row renders as the contract's Verdict: one column per field
VERDICT_FIELDS = tuple(f.name for f in dataclasses.fields(Verdict))
MAX_IDEMPOTENCY_KEY = 200


def _str_list(body: dict[str, Any], key: str, default: list[str] | None) -> list[str]:
    value = body.get(key, default)
    if value is None:
        return []
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ApiError(422, "invalid_field", f"{key} must be a list of strings")
    return list(dict.fromkeys(value))


def engine_spec(body: dict[str, Any]) -> dict[str, Any]:
    """The request as the engine's ``AuditSpec.to_dict()``: what the audit row stores and the
    worker runs. Every rule is the engine's, so the API refuses exactly what a worker would."""
    methods = _str_list(body, "methods", None)
    if not methods:
        raise ApiError(422, "invalid_field", "methods must name at least one saliency method")
    check_methods(methods)
    tests = _str_list(body, "tests", ["cascading"])
    tests = expand_tests(tests, training=bool(body.get("train_dataset_id")))
    layers = _str_list(body, "layers", None)
    layer = body.get("layer")
    if layer is not None and not isinstance(layer, str):
        raise ApiError(422, "invalid_field", "layer must be a module name (a string)")
    seed = body.get("seed", 0)
    batch_size = body.get("batch_size", 16)
    for key, value in (("seed", seed), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ApiError(422, "invalid_field", f"{key} must be an integer")
    policy = body.get("policy")
    if policy is not None:
        if not isinstance(policy, dict):
            raise ApiError(422, "invalid_policy", "policy must be a JSON object")
        try:
            load_policy(policy)
        except SpecError as exc:
            raise ApiError(422, "invalid_policy", exc.message) from None
    for key in ("params", "training", "adaptive"):
        if body.get(key) is not None and not isinstance(body[key], dict):
            raise ApiError(422, "invalid_field", f"{key} must be a JSON object")
    spec = AuditSpec.from_dict(
        {
            "methods": methods,
            "tests": tests,
            "layer": layer,
            "layers": layers or None,
            "seed": seed,
            "batch_size": batch_size,
            "device": "auto",
            "granularity": body.get("granularity", "block"),
            "stages": body.get("stages", "rule"),
            "measures": _str_list(body, "measures", list(MEASURES)),
            "policy": policy,
            "params": body.get("params") or {},
            "training": body.get("training") or {},
            "adaptive": body.get("adaptive"),
        }
    )
    return spec.to_dict()


def request_fingerprint(body: dict[str, Any]) -> str:
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def render(audit: Audit, verdicts: list[VerdictRow] | None = None) -> dict[str, Any]:
    links = {
        "self": url_for("audits.get_audit", audit_id=audit.id),
        "report": url_for("audits.report_json", audit_id=audit.id),
        "results": url_for("audits.results", audit_id=audit.id),
        "heatmaps": url_for("audits.heatmaps", audit_id=audit.id),
        "model": url_for("models.get_model", model_id=audit.model_id),
        "pdf": url_for("audits.report_pdf", audit_id=audit.id),
        "html": url_for("audits.report_html", audit_id=audit.id),
    }
    body: dict[str, Any] = {
        "id": audit.id,
        "state": audit.state,
        "progress": round(audit.progress or 0.0, 4),
        "step": audit.step,
        "attempts": audit.attempts,
        "model_id": audit.model_id,
        "dataset_id": audit.dataset_id,
        "train_dataset_id": audit.train_dataset_id,
        "spec": audit.spec,
        "error": audit.error,
        "cancel_requested": audit.cancel_requested,
        "created_at": iso(audit.created_at),
        "started_at": iso(audit.started_at),
        "heartbeat_at": iso(audit.heartbeat_at),
        "finished_at": iso(audit.finished_at),
        "verdict_summary": audit.verdict_summary,
        "estimate": audit.estimate,
        "eta_s": _eta(audit),
        "documents_state": audit.documents_state,
        "webhook": {
            "url": audit.webhook_url,
            "state": audit.webhook_state,
            "attempts": audit.webhook_attempts or 0,
            "error": audit.webhook_error,
        }
        if audit.webhook_url
        else None,
        "links": links,
    }
    if verdicts is not None:
        body["verdicts"] = [{name: getattr(v, name) for name in VERDICT_FIELDS} for v in verdicts]
    return body


def _eta(audit: Audit) -> float | None:
    """Seconds left of a running audit: its predicted wall time blended with the rate its
    progress shows (contract ``eta_seconds``); None unless it runs."""
    if audit.state != "running" or audit.started_at is None:
        return None
    predicted = (audit.estimate or {}).get("predicted_s")
    elapsed = max(0.0, (utcnow() - audit.started_at).total_seconds())
    eta = eta_seconds(
        float(predicted) if predicted is not None else None, elapsed, audit.progress or 0.0
    )
    return None if eta is None else round(eta, 1)


def _accepted(audit: Audit, replayed: bool) -> Response:
    response = jsonify(render(audit))
    response.status_code = 202 if audit.state not in FINAL_STATES else 200
    response.headers["Location"] = url_for("audits.get_audit", audit_id=audit.id)
    if audit.state not in FINAL_STATES:
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def _replay(session: Any, key: str, fingerprint: str) -> Audit | None:
    existing = session.scalars(
        select(Audit).where(Audit.tenant_id == tenant_id(), Audit.idempotency_key == key)
    ).one_or_none()
    if existing is not None and existing.request_sha256 != fingerprint:
        raise ApiError(
            422,
            "idempotency_key_reused",
            "this Idempotency-Key was used for a different request body; use a new key",
            audit_id=existing.id,
        )
    return existing


def check_layer_names(spec: dict[str, Any], model: ModelRecord) -> None:
    """Refuse ``layer`` / ``layers`` names the model does not have, with the engine's words,
    once a worker has listed the model's names (``details.layers``, written by the inspect
    task after the upload); until then the worker checks them when the audit starts."""
    known = (model.details or {}).get("layers")
    if not isinstance(known, dict):
        return
    layer = spec.get("layer")
    if layer is not None and layer not in known.get("modules", []):
        raise ApiError(422, "invalid_spec", str(unknown_cam_layer(layer, known.get("conv", []))))
    spatial = known.get("spatial", [])
    for name in spec.get("layers") or []:
        if name not in known.get("modules", []):
            raise ApiError(422, "invalid_spec", str(unknown_analysis_layer(name, spatial)))


def check_loadable(model: ModelRecord) -> None:
    """Refuse an audit of a model the worker's inspection could not load (``details.
    load_problem``: an architecture timm does not have, timm not installed in the worker,
    weights that do not match), with the worker's message, instead of queueing an audit that
    would fail with it."""
    problem = (model.details or {}).get("load_problem")
    if not isinstance(problem, dict):
        return
    raise ApiError(
        422,
        "model_not_loadable",
        f"the model does not load in the worker: {problem.get('message')}",
        cause=problem.get("code"),
    )


def check_quotas(session: Any, config: Config) -> None:
    """The tenant's audit quotas (:mod:`saliency_audit.service.quotas`): 429 ``too_many_audits``
    while its
    queue is full. (Its running cap is applied by the workers' fair claim, not here.)"""
    check_queued_audits(session, config, tenant_id())


@bp.post("")
def submit() -> Any:
    st = state()
    body = json_body()
    check_keys(body, BODY_KEYS, "audit")
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
        raise ApiError(400, "invalid_idempotency_key", "Idempotency-Key must be 1-200 characters")
    fingerprint = request_fingerprint(body)
    spec = engine_spec(body)
    webhook_url = body.get("webhook_url")
    if webhook_url is not None:
        if not isinstance(webhook_url, str):
            raise ApiError(422, "invalid_field", "webhook_url must be a string")
        try:
            check_url(webhook_url, st.config.webhook_allow_private)
        except WebhookUrlError as exc:
            raise ApiError(422, "invalid_webhook_url", str(exc)) from None
    with st.db.session() as session:
        # one transaction for the replay check, the lookups and the insert
        if key is not None and (existing := _replay(session, key, fingerprint)) is not None:
            return _accepted(existing, replayed=True)
        for field in ("model_id", "dataset_id"):
            if not isinstance(body.get(field), str):
                raise ApiError(422, "invalid_field", f"{field} is required (a string id)")
        model = session.get(ModelRecord, body["model_id"])
        if model is None or model.tenant_id != tenant_id() or model.deleted_at is not None:
            raise ApiError(422, "unknown_model", f"no model with id {body['model_id']!r}")
        dataset = _dataset(session, body["dataset_id"], "dataset_id")
        train_id = body.get("train_dataset_id")
        train: DatasetRecord | None = None
        if train_id is not None:
            train = _dataset(session, train_id, "train_dataset_id")
            if not train.labeled:
                raise ApiError(
                    422,
                    "unlabeled_training_set",
                    "train_dataset_id must be a labeled dataset (one folder of images per class)",
                )
        check_quotas(session, st.config)
        if "data_randomization" in spec["tests"] and train_id is None:
            raise ApiError(
                422,
                "training_set_required",
                "the data_randomization test needs train_dataset_id: a labeled dataset to train on",
            )
        check_loadable(model)
        predicted = check_cost(spec, model, dataset, train)
        check_layer_names(spec, model)
        audit = Audit(
            tenant_id=tenant_id(),
            model_id=model.id,
            dataset_id=dataset.id,
            train_dataset_id=train_id,
            spec=spec,
            state="queued",
            step="queued",
            idempotency_key=key,
            request_sha256=fingerprint,
            webhook_url=webhook_url,
            estimate=predicted,
        )
        if webhook_url is not None:
            tenant = session.get(Tenant, tenant_id())
            if tenant is not None and tenant.webhook_secret is None:
                tenant.webhook_secret = new_secret()
        session.add(audit)
        try:
            session.commit()
        except IntegrityError:
            # a concurrent request with the same key won the race
            session.rollback()
            existing = _replay(session, key, fingerprint) if key is not None else None
            if existing is None:
                raise
            return _accepted(existing, replayed=True)
    # committed: now it may be sent (a failed send is repaired by the reconciler)
    st.enqueue(st.db, audit.id)
    return _accepted(audit, replayed=False)


def input_size(model: ModelRecord) -> tuple[int, int]:
    """The model's input height and width: the caller's input spec, else the static NCHW or
    NHWC input shape of the model's details (an ONNX graph's, or the one the worker's
    inspection resolved for a weights file: a timm pretrained_cfg's), else 224 x 224 (the
    engine's default)."""
    given = model.input_spec or {}
    shape = (model.details or {}).get("input_shape") or []
    static = [d if isinstance(d, int) and d > 0 else None for d in shape]
    height = width = None
    if len(static) == 4:
        nhwc = static[3] in (1, 3) and static[1] not in (1, 3)
        height, width = (static[1], static[2]) if nhwc else (static[2], static[3])
    return int(given.get("height") or height or 224), int(given.get("width") or width or 224)


def check_cost(
    spec: dict[str, Any],
    model: ModelRecord,
    dataset: DatasetRecord,
    train: DatasetRecord | None,
) -> dict[str, Any]:
    """The audit's predicted wall time (``estimate`` of the audit), and a refusal of an audit
    predicted above the budget (a 422 that states the prediction and the limit), before it is
    queued. With the model's pass times measured by a worker's inspection
    (``details.pass_prices``) the prediction is the cost model's (workers/engine/contract/
    cost.py :func:`predict`); before the inspection has run, the default price per
    row-megapixel (``cost_fb_s_per_row_megapixel``), and the estimate says which."""
    config = state().config
    audit_spec = AuditSpec.from_dict(spec)
    families = families_of(catalogue()["methods"])
    rules = rule_stages(audit_spec.policy)
    measured = (model.details or {}).get("pass_prices")
    train_images = train.n_images if train is not None else 0
    found: dict[str, Any]
    if isinstance(measured, dict):
        prices = PassPrices.from_dict(measured)
        predicted = predict(
            audit_spec,
            families,
            prices,
            images=dataset.n_images,
            onnx=model.format == "onnx",
            train_images=train_images,
            rule_stages=rules,
        )
        seconds = predicted.seconds
        found = {**predicted.to_dict(), "measured": True}
    else:
        height, width = input_size(model)
        tensors = int((model.details or {}).get("tensors") or 1)
        priced = estimate(
            audit_spec,
            families,
            images=dataset.n_images,
            stages=stages_of(tensors, audit_spec.granularity),
            height=height,
            width=width,
            fb_s_per_row_megapixel=config.cost_fb_s_per_row_megapixel,
            onnx=model.format == "onnx",
            train_images=train_images,
            rule_stages=rules,
        )
        seconds = priced.seconds
        found = {
            "predicted_s": round(seconds, 1),
            "basis": (
                "the default price per row-megapixel: no worker has measured this model's "
                "passes yet"
            ),
            "measured": False,
            **{k: v for k, v in priced.to_dict().items() if k != "estimated_cost_s"},
        }
    if seconds > config.max_audit_cost_s:
        raise ApiError(
            422,
            "audit_too_costly",
            f"the audit is predicted to take {seconds:,.0f} s of worker time, above the limit "
            f"of {config.max_audit_cost_s:,.0f} s: fewer images, methods, tests, samples or "
            "steps, or a coarser granularity bring it down",
            limit_s=config.max_audit_cost_s,
            estimated_cost_s=round(seconds, 1),
            estimate=found,
            **{k: found[k] for k in ("forward_backward_rows", "forward_rows") if k in found},
        )
    return found


def _dataset(session: Any, dataset_id: Any, field: str) -> DatasetRecord:
    row = session.get(DatasetRecord, dataset_id) if isinstance(dataset_id, str) else None
    if row is None or row.tenant_id != tenant_id() or row.deleted_at is not None:
        raise ApiError(422, "unknown_dataset", f"{field}: no dataset with id {dataset_id!r}")
    return row


@bp.get("")
def list_audits() -> Any:
    model_id = request.args.get("model_id")
    state_filter = request.args.get("state")
    if state_filter is not None and state_filter not in AUDIT_STATES:
        raise ApiError(400, "invalid_filter", f"state must be one of {', '.join(AUDIT_STATES)}")
    with state().db.session() as session:
        query = select(Audit).where(Audit.tenant_id == tenant_id())
        if model_id is not None:
            query = query.where(Audit.model_id == model_id)
        if state_filter is not None:
            query = query.where(Audit.state == state_filter)
        query = query.order_by(Audit.created_at.desc(), Audit.id)
        return jsonify(
            paginated(
                session,
                query,
                render,
                "audits.list_audits",
                model_id=model_id,
                state=state_filter,
            )
        )


@bp.get(routes.AUDIT.rule)
def get_audit(audit_id: str) -> Any:
    with state().db.session() as session:
        audit = get_owned(session, Audit, audit_id, "audit")
        verdicts = None
        if audit.state == "succeeded":
            verdicts = session.scalars(
                select(VerdictRow).where(VerdictRow.audit_id == audit.id).order_by(VerdictRow.id)
            ).all()
        response = jsonify(render(audit, list(verdicts) if verdicts is not None else None))
        if audit.state not in FINAL_STATES:
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response


@bp.delete(routes.AUDIT.rule)
def cancel(audit_id: str) -> Any:
    """Cancel or delete. An active audit is canceled (a queued one at once, 200; a running one
    at its next heartbeat, 202). A final one is deleted (204): its rows and the files no other
    row needs (:mod:`saliency_audit.service.purge`)."""
    st = state()
    with st.db.session() as session:
        audit = get_owned(session, Audit, audit_id, "audit")
        if audit.state in FINAL_STATES:
            files = purge.delete_audits(session, [audit.id], purge.Deleted())
        else:
            files = None
            audit.cancel_requested = True
            if audit.state == "queued":
                audit.state = "canceled"
                audit.step = "canceled"
                audit.finished_at = utcnow()
            session.flush()
            response = jsonify(render(audit))
    if files is not None:
        purge.remove_unreferenced(st.db, st.store, files)
        return "", 204
    if audit.state == "canceled":
        announce_finished(st.db, st.enqueue, audit.id)
    response.status_code = 202 if audit.state != "canceled" else 200
    return response


def send_stored(
    sha256: str, media_type: str, *, immutable: bool = False, missing_code: str = "artifact_missing"
) -> Any:
    """A file of the artifact store as the response, with its sha256 as the ETag (a
    conditional GET answers 304); ``immutable`` files may be cached by the client."""
    try:
        handle = state().store.open(sha256)
    except ArtifactMissing:
        raise ApiError(500, missing_code, "the stored file is missing") from None
    response = send_file(handle, mimetype=media_type, etag=sha256, conditional=True)
    # as stored ("text/html; charset=utf-8"): Werkzeug would append a second charset to a text/*
    # type that already names one
    response.content_type = media_type
    if immutable:
        response.headers["Cache-Control"] = "private, max-age=86400, immutable"
    return response


def _finished(session: Any, audit_id: str) -> Audit:
    audit = get_owned(session, Audit, audit_id, "audit")
    if audit.state != "succeeded":
        raise ApiError(
            409,
            "audit_not_succeeded",
            f"the audit is {audit.state}; results exist once it has succeeded",
            state=audit.state,
        )
    return audit


@bp.get(routes.AUDIT_REPORT_JSON.rule)
def report_json(audit_id: str) -> Any:
    st = state()
    with st.db.session() as session:
        audit = _finished(session, audit_id)
        sha = audit.report_sha256
    if sha is None:
        raise ApiError(500, "report_missing", "the audit has no stored report")
    return send_stored(sha, "application/json", missing_code="report_missing")


@bp.get(routes.AUDIT_RESULTS.rule)
def results(audit_id: str) -> Any:
    """Every score row, filterable by method, test, measure and stage."""
    with state().db.session() as session:
        _finished(session, audit_id)
        query = select(ResultRow).where(ResultRow.audit_id == audit_id)
        for key in ("method", "test", "measure", "stage"):
            if (value := request.args.get(key)) is not None:
                query = query.where(getattr(ResultRow, key) == value)
        rows = session.scalars(query.order_by(ResultRow.id)).all()
        return jsonify(
            items=[
                {
                    "method": r.method,
                    "test": r.test,
                    "measure": r.measure,
                    "stage": r.stage,
                    "stage_index": r.stage_index,
                    "mean": r.mean,
                    "ci_low": r.ci_low,
                    "ci_high": r.ci_high,
                    "n": r.n,
                    "n_undefined": r.n_undefined,
                }
                for r in rows
            ]
        )


@bp.get(routes.AUDIT_HEATMAPS.rule)
def heatmaps(audit_id: str) -> Any:
    """The heatmap PNGs: the trained model's maps (test ``model``, stage ``trained``), the
    maps each test kept per stage, and the ``layers`` analysis' overlays (kind
    ``overlay_png``); filterable by kind, method, test, stage and image."""
    with state().db.session() as session:
        _finished(session, audit_id)
        query = select(AuditArtifact).where(
            AuditArtifact.audit_id == audit_id,
            AuditArtifact.kind.in_(PICTURE_KINDS),
        )
        for key in ("kind", "method", "test", "stage", "image"):
            if (value := request.args.get(key)) is not None:
                query = query.where(getattr(AuditArtifact, key) == value)
        rows = session.scalars(query.order_by(AuditArtifact.id)).all()
        return jsonify(
            items=[
                {
                    "kind": r.kind,
                    "method": r.method,
                    "test": r.test,
                    "stage": r.stage,
                    "image": r.image,
                    "sha256": r.sha256,
                    "url": url_for("audits.heatmap_png", audit_id=audit_id, heatmap_id=r.id),
                }
                for r in rows
            ]
        )


@bp.get("/<audit_id>/heatmaps/<int:heatmap_id>.png")
def heatmap_png(audit_id: str, heatmap_id: int) -> Any:
    st = state()
    with st.db.session() as session:
        audit = get_owned(session, Audit, audit_id, "audit")
        row = session.get(AuditArtifact, heatmap_id)
        if row is None or row.audit_id != audit.id or row.kind not in PICTURE_KINDS:
            raise ApiError(404, "not_found", f"no heatmap {heatmap_id} in audit {audit_id}")
        sha = row.sha256
    return send_stored(sha, "image/png", immutable=True)


@bp.get(routes.AUDIT_ARTIFACT.rule)
def artifact(audit_id: str, sha256: str) -> Any:
    """Any file the audit produced, by the sha256 that ``report.json``'s ``artifacts`` lists."""
    st = state()
    with st.db.session() as session:
        audit = get_owned(session, Audit, audit_id, "audit")
        row = session.scalars(
            select(AuditArtifact)
            .where(AuditArtifact.audit_id == audit.id, AuditArtifact.sha256 == sha256)
            .limit(1)
        ).first()
        if row is None:
            raise ApiError(404, "not_found", f"no artifact {sha256} in audit {audit_id}")
        media_type = row.media_type
    return send_stored(sha256, media_type, immutable=True)


def _document(audit_id: str, kind: str) -> Any:
    st = state()
    with st.db.session() as session:
        audit = _finished(session, audit_id)
        if audit.documents_state == "failed":
            raise ApiError(
                500,
                "report_render_failed",
                f"rendering the reports failed: {audit.documents_error}",
            )
        row = session.scalars(
            select(AuditArtifact).where(
                AuditArtifact.audit_id == audit.id, AuditArtifact.kind == kind
            )
        ).first()
        if row is None:
            raise ApiError(
                409,
                "report_rendering",
                "the report is being rendered; retry shortly",
                retry_after_s=RETRY_AFTER_S,
                documents_state=audit.documents_state,
            )
        sha, media_type = row.sha256, row.media_type
    return send_stored(sha, media_type)


@bp.get(routes.AUDIT_REPORT_PDF.rule)
def report_pdf(audit_id: str) -> Any:
    """The PDF report (rendered on the CPU queue once the audit succeeded: 409 until then)."""
    return _document(audit_id, "report_pdf")


@bp.get(routes.AUDIT_REPORT_HTML.rule)
def report_html(audit_id: str) -> Any:
    """The same report as one self-contained HTML page."""
    return _document(audit_id, "report_html")
