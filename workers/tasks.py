"""The audit task: load the audit's inputs, run the engine, store its outputs.

Thin glue around :func:`workers.engine.runner.run_audit`. The job lifecycle (claim, heartbeat,
ownership, the final transaction) is :mod:`service.jobs`; this module only moves data between
the database, the artifact store and the engine. torch and the engine are imported inside the
task, so they load in the pool child, never in the worker's parent process.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import delete, select, update
from sqlalchemy.exc import InterfaceError, OperationalError

from service.artifacts import ArtifactStore
from service.config import Config
from service.db import Database
from service.jobs import (
    Claim,
    Enqueuer,
    Lost,
    Ownership,
    announce_finished,
    claim,
    worker_identity,
)
from service.models import Audit, AuditArtifact, DatasetRecord, ModelRecord, ResultRow, VerdictRow

from .celery import app

log = logging.getLogger(__name__)

# the database is unreachable (a restart, a failover): worth waiting out, never a verdict
DATABASE_DOWN = (OperationalError, InterfaceError)
HEATMAP_IMAGES = 16  # images whose trained-model heatmaps are rendered as PNGs
TRAINED_STAGE = "trained"
MODEL_TEST = "model"  # the "test" of the trained model's own maps


@dataclass
class Runtime:
    config: Config
    db: Database
    store: ArtifactStore


@cache
def _runtime(pid: int) -> Runtime:
    """One database pool per process (keyed by pid: a forked child must not reuse its
    parent's connections)."""
    config: Config = app.conf.saliency_audit_config
    return Runtime(
        config, Database.from_config(config), ArtifactStore(config.resolved_artifact_dir)
    )


def runtime() -> Runtime:
    return _runtime(os.getpid())


@app.task(name="workers.run_audit", bind=True)
def run_audit_task(self: Any, audit_id: str) -> str:
    rt = runtime()
    outcome = execute(rt, audit_id)
    if outcome in ("succeeded", "failed", "canceled", Claim.EXHAUSTED.value):
        announce_finished(rt.db, enqueuer(), audit_id)
    return outcome


@cache
def _enqueuer_for(pid: int) -> Enqueuer:
    return Enqueuer(app.conf.saliency_audit_config, app)


def enqueuer() -> Enqueuer:
    """One enqueuer per process, like the runtime (sends follow-up tasks and parts)."""
    return _enqueuer_for(os.getpid())


@app.task(name="workers.render_reports", bind=True)
def render_reports_task(self: Any, audit_id: str) -> str:
    return render_documents(runtime(), audit_id)


@app.task(name="workers.deliver_webhook", bind=True, max_retries=None)
def deliver_webhook_task(self: Any, audit_id: str) -> str:
    rt = runtime()
    outcome = deliver_webhook(rt, audit_id)
    if outcome == "retry":
        attempt = self.request.retries
        raise self.retry(countdown=rt.config.webhook_backoff_s * 2**attempt)
    return outcome


def render_documents(rt: Runtime, audit_id: str) -> str:
    """The PDF and HTML reports of a succeeded audit, from its stored report.json and
    pictures; idempotent (a re-run replaces the previous documents)."""
    from workers.reports.html import render_html
    from workers.reports.pdf import render_pdf

    with rt.db.session() as session:
        audit = session.get(Audit, audit_id)
        if audit is None or audit.state != "succeeded" or audit.report_sha256 is None:
            return "skipped"
        report_sha, tenant_id = audit.report_sha256, audit.tenant_id
    try:
        report = json.loads(rt.store.read_bytes(report_sha))
        documents = {
            "report_pdf": ("application/pdf", render_pdf(report, rt.store.read_bytes)),
            "report_html": (
                "text/html; charset=utf-8",
                render_html(report, rt.store.read_bytes).encode(),
            ),
        }
    except Exception as exc:
        log.exception("rendering the reports of audit %s failed", audit_id)
        with rt.db.session() as session:
            session.execute(
                update(Audit)
                .where(Audit.id == audit_id)
                .values(documents_state="failed", documents_error=f"{type(exc).__name__}: {exc}")
            )
        return "failed"
    with rt.db.session() as session:
        session.execute(
            delete(AuditArtifact).where(
                AuditArtifact.audit_id == audit_id, AuditArtifact.kind.in_(list(documents))
            )
        )
        for kind, (media_type, data) in documents.items():
            session.add(
                AuditArtifact(
                    tenant_id=tenant_id,
                    audit_id=audit_id,
                    kind=kind,
                    sha256=rt.store.put_bytes(data),
                    media_type=media_type,
                    size_bytes=len(data),
                )
            )
        session.execute(
            update(Audit)
            .where(Audit.id == audit_id)
            .values(documents_state="ready", documents_error=None)
        )
    return "ready"


def deliver_webhook(rt: Runtime, audit_id: str) -> str:
    """One attempt: ``delivered``, ``retry`` (attempts left) or ``failed``."""
    from service.models import Tenant
    from service.webhooks import payload, post

    with rt.db.session() as session:
        audit = session.get(Audit, audit_id)
        if audit is None or audit.webhook_url is None or audit.webhook_state == "delivered":
            return "skipped"
        tenant = session.get(Tenant, audit.tenant_id)
        secret = tenant.webhook_secret if tenant is not None else None
        body, url = payload(audit), audit.webhook_url
    if secret is None:  # set at submission; a tenant row without one cannot sign
        outcome, detail = False, "the tenant has no webhook secret"
    else:
        outcome, detail = post(
            url, secret, body, rt.config.webhook_timeout_s, rt.config.webhook_allow_private
        )
    with rt.db.session() as session:
        audit = session.get(Audit, audit_id)
        assert audit is not None
        audit.webhook_attempts = (audit.webhook_attempts or 0) + 1
        audit.webhook_error = None if outcome else detail
        if outcome:
            audit.webhook_state = "delivered"
        elif audit.webhook_attempts >= rt.config.webhook_max_attempts:
            audit.webhook_state = "failed"
        attempts = audit.webhook_attempts
    if outcome:
        return "delivered"
    log.warning("webhook of audit %s, attempt %d: %s", audit_id, attempts, detail)
    return "failed" if attempts >= rt.config.webhook_max_attempts else "retry"


class _Heartbeat(threading.Thread):
    """Writes the heartbeat (and the latest progress) every ``interval_s``, so a long engine
    step without progress calls still shows the worker alive; notes when ownership is lost."""

    def __init__(self, owner: Ownership, interval_s: float) -> None:
        super().__init__(name=f"heartbeat-{owner.audit_id}", daemon=True)
        self.owner = owner
        self.interval_s = interval_s
        self.stop = threading.Event()
        self.lost: Lost | None = None
        self.progress: tuple[float, str] | None = None

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            try:
                latest = self.progress
                if latest is None:
                    self.owner.heartbeat()
                else:
                    self.owner.heartbeat(*latest)
            except Lost as exc:
                self.lost = exc
                return
            except Exception as exc:  # the database may blip; the next beat retries
                log.warning("heartbeat for %s failed: %s", self.owner.audit_id, exc)


def execute(rt: Runtime, audit_id: str) -> str:
    worker = worker_identity()
    outcome = claim(rt.db, audit_id, worker, rt.config)
    if outcome is not Claim.CLAIMED:
        log.info("audit %s not run by %s: %s", audit_id, worker, outcome.value)
        return outcome.value
    owner = Ownership(rt.db, audit_id, worker)
    beat = _Heartbeat(owner, rt.config.heartbeat_interval_s)
    beat.start()
    last_write = [0.0]

    def progress(fraction: float, step: str) -> None:
        if beat.lost is not None:
            raise beat.lost
        beat.progress = (fraction, step)
        now = time.monotonic()
        if now - last_write[0] >= 1.0:
            last_write[0] = now
            try:
                owner.heartbeat(fraction, step)
            except DATABASE_DOWN as exc:
                # the heartbeat thread keeps trying; the computation need not stop for it
                log.warning("progress of %s not written: %s", audit_id, exc)

    try:
        _run(rt, audit_id, owner, progress)
        return "succeeded"
    except Lost as exc:
        if exc.reason == "canceled":
            owner.finish_canceled()
            return "canceled"
        return "lost"
    except SoftTimeLimitExceeded:
        owner.fail(
            {
                "code": "time_limit",
                "message": f"the audit ran past the soft time limit of "
                f"{rt.config.soft_time_limit_s} s",
            }
        )
        return "failed"
    except DATABASE_DOWN:
        # Nothing can be written now: leave the audit running; its heartbeat goes stale and
        # the reconciler queues it again (the attempt is counted), so the audit is not lost.
        log.exception("audit %s: the database went away", audit_id)
        raise
    except Exception as exc:
        from workers.engine.errors import EngineError

        if isinstance(exc, EngineError):
            owner.fail(_jsonable(exc.to_dict()))
        else:
            log.exception("audit %s failed", audit_id)
            owner.fail({"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"})
        return "failed"
    finally:
        beat.stop.set()
        beat.join(timeout=10)


def _jsonable(value: dict[str, object]) -> dict[str, Any]:
    return dict(json.loads(json.dumps(value, default=str)))


@dataclass
class Inputs:
    """What an audit (or one of its parts) runs on, loaded from the database and the store."""

    spec: Any  # AuditSpec
    model: Any  # LoadedModel
    images: Any  # the preprocessed (N, C, H, W) tensor
    decoded: list[Any]  # DecodedImage, for names and overlays
    dataset: DatasetRecord
    tenant_id: str
    train: Any = None  # LabeledImages
    masks: Any = None  # (N, H, W) bool tensor


def load_inputs(rt: Runtime, audit_id: str) -> Inputs:
    import torch

    from workers.engine.data_randomization import LabeledImages
    from workers.engine.image_files import class_indices
    from workers.engine.images import decode_image, preprocess
    from workers.engine.models.loader import load_model
    from workers.engine.spec import AuditSpec

    with rt.db.session() as session:
        audit = session.get(Audit, audit_id)
        assert audit is not None
        model_row = session.get(ModelRecord, audit.model_id)
        dataset = session.get(DatasetRecord, audit.dataset_id)
        train_set = (
            session.get(DatasetRecord, audit.train_dataset_id) if audit.train_dataset_id else None
        )
        spec_data = dict(audit.spec)
        tenant_id = audit.tenant_id
    assert model_row is not None and dataset is not None
    spec = AuditSpec.from_dict(spec_data)
    model = load_model(
        rt.store.read_bytes(model_row.sha256),
        architecture=model_row.architecture if model_row.format != "onnx" else None,
        input_spec_overrides=model_row.input_spec or None,
    )
    channels = model.input_spec.channels

    def decoded(record: DatasetRecord) -> list[Any]:
        return [
            decode_image(rt.store.read_bytes(item["sha256"]), item["name"], channels)
            for item in record.manifest["images"]
        ]

    images_decoded = decoded(dataset)
    inputs = Inputs(
        spec=spec,
        model=model,
        images=preprocess(images_decoded, model.input_spec),
        decoded=images_decoded,
        dataset=dataset,
        tenant_id=tenant_id,
    )
    if "layers" in spec.tests:
        inputs.masks = _ground_truth(rt, dataset, images_decoded, model.input_spec)
    if train_set is not None:
        items = train_set.manifest["images"]
        folders = sorted({str(item["label"]) for item in items})
        index = class_indices(folders, model.input_spec.class_names)
        inputs.train = LabeledImages(
            preprocess(decoded(train_set), model.input_spec),
            torch.tensor([index[str(item["label"])] for item in items], dtype=torch.int64),
        )
    return inputs


def compute(inputs: Inputs, spec: Any, progress: Any) -> Any:
    """``run_audit`` on the loaded inputs with ``spec`` (the whole audit's, or a part's)."""
    from workers.engine.runner import run_audit

    return run_audit(
        inputs.model,
        inputs.images,
        spec,
        image_names=[d.name for d in inputs.decoded],
        train=inputs.train,
        masks=inputs.masks,
        progress=progress,
    )


def _run(rt: Runtime, audit_id: str, owner: Ownership, progress: Any) -> None:
    import numpy as np

    from workers.engine.merge import splittable

    from .parts import run_split

    progress(0.0, "loading the model and images")
    inputs = load_inputs(rt, audit_id)
    spec, dataset, tenant_id, images_decoded = (
        inputs.spec,
        inputs.dataset,
        inputs.tenant_id,
        inputs.decoded,
    )
    scaled = lambda f, step: progress(0.02 + 0.9 * f, step)  # noqa: E731
    if rt.config.audit_parts > 1 and splittable(spec):
        result = run_split(rt, audit_id, inputs, scaled)
    else:
        result = compute(inputs, spec, scaled)
    progress(0.93, "rendering heatmaps")
    pictures = _heatmaps(rt, tenant_id, audit_id, result, images_decoded)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **result.maps)
    maps_bytes = buffer.getvalue()
    maps_sha = rt.store.put_bytes(maps_bytes)
    report = result.to_dict()
    report["audit_id"] = audit_id
    with rt.db.session() as session:
        submitted = session.scalar(select(Audit.created_at).where(Audit.id == audit_id))
    report["created_at"] = submitted.isoformat() if submitted is not None else None
    report["dataset"] = {
        "id": dataset.id,
        "name": dataset.name,
        "sha256": dataset.sha256,
        "n_images": dataset.n_images,
        "labeled": dataset.labeled,
        "has_masks": dataset.has_masks,
        "has_boxes": dataset.has_boxes,
    }
    report["links"] = {
        "audit": f"/v1/audits/{audit_id}",
        "report_json": f"/v1/audits/{audit_id}/report.json",
        "report_pdf": f"/v1/audits/{audit_id}/report.pdf",
        "report_html": f"/v1/audits/{audit_id}/report",
        "results": f"/v1/audits/{audit_id}/results",
        "heatmaps": f"/v1/audits/{audit_id}/heatmaps",
    }
    report["artifacts"] = [
        {
            "kind": a.kind,
            "method": a.method,
            "test": a.test,
            "stage": a.stage,
            "image": a.image,
            "sha256": a.sha256,
            "media_type": a.media_type,
            "url": f"/v1/audits/{audit_id}/artifacts/{a.sha256}",
        }
        for a in pictures
    ]
    report_sha = rt.store.put_bytes((json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
    artifacts = [
        AuditArtifact(
            tenant_id=tenant_id,
            audit_id=audit_id,
            kind="report_json",
            sha256=report_sha,
            media_type="application/json",
            size_bytes=rt.store.path(report_sha).stat().st_size,
        ),
        AuditArtifact(
            tenant_id=tenant_id,
            audit_id=audit_id,
            kind="maps_npz",
            sha256=maps_sha,
            media_type="application/octet-stream",
            size_bytes=len(maps_bytes),
        ),
    ]
    artifacts += pictures

    progress(0.98, "storing results")

    def write(session: Any) -> dict[str, Any]:
        for test in result.tests.values():
            for score in test.scores:
                session.add(
                    ResultRow(
                        tenant_id=tenant_id,
                        audit_id=audit_id,
                        method=score.method,
                        test=score.test,
                        measure=score.measure,
                        stage=score.stage,
                        stage_index=score.stage_index,
                        mean=score.mean,
                        ci_low=score.ci_low,
                        ci_high=score.ci_high,
                        n=score.n,
                        n_undefined=score.n_undefined,
                    )
                )
        summary: dict[str, dict[str, str]] = {}
        for v in result.verdicts:
            summary.setdefault(v.method, {})[v.test] = v.verdict
            session.add(VerdictRow(tenant_id=tenant_id, audit_id=audit_id, **asdict(v)))
        session.add_all(artifacts)
        return {"report_sha256": report_sha, "maps_sha256": maps_sha, "verdict_summary": summary}

    if not owner.succeed(write):
        raise Lost("the audit is no longer owned by this worker")


def _ground_truth(rt: Runtime, dataset: DatasetRecord, images: list[Any], spec: Any) -> Any:
    """(N, H, W) object masks at the model's input size when every image has a mask or boxes
    in the dataset, else None (localization needs ground truth for each image)."""
    from workers.engine.faithfulness import boxes_to_mask
    from workers.engine.images import decode_mask, masks_tensor

    items = dataset.manifest["images"]
    if not all(item.get("mask_sha256") or item.get("boxes") for item in items):
        return None
    masks = []
    for item, image in zip(items, images, strict=True):
        if item.get("mask_sha256"):
            masks.append(decode_mask(rt.store.read_bytes(item["mask_sha256"]), item["name"]))
        else:
            height, width = image.pixels.shape[:2]
            masks.append(boxes_to_mask(item["boxes"], height, width).numpy())
    return masks_tensor(masks, spec)


def _heatmaps(
    rt: Runtime, tenant_id: str, audit_id: str, result: Any, images: list[Any]
) -> list[AuditArtifact]:
    """PNGs of the trained model's maps for the first images, of every map a test kept for
    its heatmap grids (the first images at each stage), and for the ``layers`` analysis the
    maps laid over their images (per image, method and layer)."""
    from workers.reports.heatmaps import heatmap_png, overlay_png

    rows: list[AuditArtifact] = []

    def add(test: str, stage: str, method: str, maps: Any, count: int, overlay: bool) -> None:
        for i in range(min(count, len(maps))):
            png = overlay_png(maps[i], images[i].pixels) if overlay else heatmap_png(maps[i])
            rows.append(
                AuditArtifact(
                    tenant_id=tenant_id,
                    audit_id=audit_id,
                    kind="overlay_png" if overlay else "heatmap_png",
                    method=method,
                    test=test,
                    stage=stage,
                    image=images[i].name,
                    sha256=rt.store.put_bytes(png),
                    media_type="image/png",
                    size_bytes=len(png),
                )
            )

    for method, maps in result.maps.items():
        add(MODEL_TEST, TRAINED_STAGE, method, maps, HEATMAP_IMAGES, overlay=False)
    for test_name, test in result.tests.items():
        for stage, by_method in test.example_maps.items():
            for method, maps in by_method.items():
                add(test_name, stage, method, maps, len(maps), overlay=test_name == "layers")
    return rows
