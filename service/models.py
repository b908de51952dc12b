"""SQLAlchemy 2 models: the service's state.

Every row carries its tenant and every query filters by it (:mod:`service.tenancy`). The audit
row is the truth about a job: its state, progress, heartbeat and attempts are what the API
reports and what the reconciler acts on. Files (uploads, maps, PNGs, reports) live in the
content-addressed artifact store and are referenced by sha256.

The schema changes only through Alembic migrations (``migrations/versions``); a test checks
that the migrations produce exactly these tables.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Connection,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    delete,
    event,
    insert,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# declared in .states (the gate reads them without SQLAlchemy); re-exported for the blueprints
from .states import AUDIT_STATES as AUDIT_STATES
from .states import FINAL_STATES as FINAL_STATES

# Stable constraint names, so migrations can refer to them on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware everywhere: SQLite keeps no zone, so values are stored as UTC and the
    zone is put back on read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC)
            if dialect.name == "sqlite":
                value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # signs webhook deliveries (HMAC-SHA256); shown by `saliency-audit keys webhook-secret`
    webhook_secret: Mapped[str | None] = mapped_column(String(100))


class ApiKey(Base):
    """An API key is shown once; the row keeps its public prefix (for lookup) and the sha256
    of the whole key (compared in constant time)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_sha256: Mapped[str] = mapped_column(String(64))
    label: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


def _unique_while_live(table: str) -> Index:
    """One live row per (tenant, sha256): uploading the same bytes again answers with it. A
    deleted row that finished audits still refer to (a tombstone) does not count, so the same
    bytes uploaded after a delete make a new object with a new id."""
    live = text("deleted_at IS NULL")
    return Index(
        f"uq_{table}_tenant_sha_live",
        "tenant_id",
        "sha256",
        unique=True,
        postgresql_where=live,
        sqlite_where=live,
    )


class ModelRecord(Base):
    __tablename__ = "models"
    __table_args__ = (_unique_while_live("models"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(300))
    format: Mapped[str] = mapped_column(String(20))  # onnx | safetensors | torch
    architecture: Mapped[str | None] = mapped_column(String(100))
    # the store's file of these bytes; more than one row (tenants, tombstones) may name it
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    input_spec: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # user overrides
    class_names: Mapped[list[Any] | None] = mapped_column(JSON)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # what the check found
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # set on a tombstone: a deleted model that finished audits still name; its file is gone
    # (unless another live row holds the same bytes), its metadata stays as their evidence
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class DatasetRecord(Base):
    __tablename__ = "datasets"
    __table_args__ = (_unique_while_live("datasets"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(300))
    sha256: Mapped[str] = mapped_column(String(64))  # of the uploaded archive
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    n_images: Mapped[int] = mapped_column(Integer)
    labeled: Mapped[bool] = mapped_column(default=False)
    has_masks: Mapped[bool] = mapped_column(default=False)
    has_boxes: Mapped[bool] = mapped_column(default=False)
    class_names: Mapped[list[Any] | None] = mapped_column(JSON)
    # images: name, sha256, label, width, height, mask_sha256, boxes
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # a tombstone, as for models: the manifest (names and hashes) stays, the images go
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


def manifest_files(manifest: dict[str, Any] | None) -> set[str]:
    """The store's files a dataset manifest names: its images and masks."""
    files: set[str] = set()
    for item in (manifest or {}).get("images", []):
        files.update(item[key] for key in ("sha256", "mask_sha256") if item.get(key))
    return files


class DatasetFile(Base):
    """A file of the store that a live dataset uses: the manifest's JSON, indexed by sha256 so
    that deleting a dataset can ask whether any other dataset still needs an image. Kept in
    step with the manifest by :func:`_index_dataset_files`, never written by hand."""

    __tablename__ = "dataset_files"

    dataset_id: Mapped[str] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True
    )
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)


@event.listens_for(DatasetRecord, "after_insert")
@event.listens_for(DatasetRecord, "after_update")
def _index_dataset_files(mapper: Any, connection: Connection, target: DatasetRecord) -> None:
    connection.execute(delete(DatasetFile).where(DatasetFile.dataset_id == target.id))
    files = manifest_files(target.manifest) if target.deleted_at is None else set()
    if files:
        connection.execute(
            insert(DatasetFile),
            [{"dataset_id": target.id, "tenant_id": target.tenant_id, "sha256": f} for f in files],
        )


class Audit(Base):
    __tablename__ = "audits"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_audits_tenant_idem"),
        Index("ix_audits_state_heartbeat", "state", "heartbeat_at"),
        Index("ix_audits_tenant_created", "tenant_id", "created_at"),
        # the fair claim's "served longest ago": a tenant's latest claim is one index lookup
        Index("ix_audits_tenant_started", "tenant_id", "started_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), index=True)
    train_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"))
    # the validated request: methods, tests, layers, policy, seed, ...
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(20), default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    step: Mapped[str | None] = mapped_column(String(300))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_sha256: Mapped[str] = mapped_column(String(64))
    task_id: Mapped[str | None] = mapped_column(String(64))
    # the broker queue its message went to: a worker's fair claim picks from its own queue
    queue: Mapped[str | None] = mapped_column(String(200))
    worker: Mapped[str | None] = mapped_column(String(200))  # hostname:pid of the attempt
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    report_sha256: Mapped[str | None] = mapped_column(String(64))
    maps_sha256: Mapped[str | None] = mapped_column(String(64))
    verdict_summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # method -> verdict
    # the predicted wall time at submit (workers/engine/contract/cost.py): seconds, basis, parts
    estimate: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # the PDF and HTML reports, rendered on the CPU queue after the audit succeeded:
    # pending -> ready | failed (with documents_error)
    documents_state: Mapped[str | None] = mapped_column(String(20))
    documents_error: Mapped[str | None] = mapped_column(Text)
    # POSTed (HMAC-signed) when the audit ends: pending -> delivered | failed
    webhook_url: Mapped[str | None] = mapped_column(String(2000))
    webhook_state: Mapped[str | None] = mapped_column(String(20))
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0)
    webhook_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class AuditPart(Base):
    """One share of a split audit (a group of method families), computed by whichever worker
    claims it; the audit's own worker merges the parts
    (:mod:`saliency_audit.workers.engine.merge`)."""

    __tablename__ = "audit_parts"
    __table_args__ = (UniqueConstraint("audit_id", "part_index", name="uq_audit_parts_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    audit_id: Mapped[str] = mapped_column(ForeignKey("audits.id", ondelete="CASCADE"), index=True)
    part_index: Mapped[int] = mapped_column(Integer)
    methods: Mapped[list[Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(20), default="queued")  # queued|running|done
    worker: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    result_sha256: Mapped[str | None] = mapped_column(String(64))  # the part's report + maps


class ResultRow(Base):
    """One score: (method, test, measure, stage) with mean, 95% CI and n."""

    __tablename__ = "results"
    __table_args__ = (
        UniqueConstraint(
            "audit_id", "method", "test", "measure", "stage", name="uq_results_audit_key"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    audit_id: Mapped[str] = mapped_column(ForeignKey("audits.id", ondelete="CASCADE"), index=True)
    method: Mapped[str] = mapped_column(String(100))
    test: Mapped[str] = mapped_column(String(100))
    measure: Mapped[str] = mapped_column(String(100))
    stage: Mapped[str] = mapped_column(String(300))
    stage_index: Mapped[int] = mapped_column(Integer)
    mean: Mapped[float | None] = mapped_column(Float)
    ci_low: Mapped[float | None] = mapped_column(Float)
    ci_high: Mapped[float | None] = mapped_column(Float)
    n: Mapped[int] = mapped_column(Integer)
    n_undefined: Mapped[int] = mapped_column(Integer, default=0)


class VerdictRow(Base):
    """One verdict of an audit: a column per field of the contract's ``Verdict``."""

    __tablename__ = "verdicts"
    __table_args__ = (UniqueConstraint("audit_id", "method", "test", name="uq_verdicts_audit_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    audit_id: Mapped[str] = mapped_column(ForeignKey("audits.id", ondelete="CASCADE"), index=True)
    method: Mapped[str] = mapped_column(String(100))
    test: Mapped[str] = mapped_column(String(100))
    verdict: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str] = mapped_column(Text)
    measure: Mapped[str | None] = mapped_column(String(100))
    stage: Mapped[str | None] = mapped_column(String(300))
    threshold: Mapped[float | None] = mapped_column(Float)
    fail_threshold: Mapped[float | None] = mapped_column(Float)
    pass_when: Mapped[str | None] = mapped_column(String(20))
    mean: Mapped[float | None] = mapped_column(Float)
    ci_low: Mapped[float | None] = mapped_column(Float)
    ci_high: Mapped[float | None] = mapped_column(Float)
    n: Mapped[int] = mapped_column(Integer, default=0)
    is_control: Mapped[bool] = mapped_column(default=False)
    policy_version: Mapped[str | None] = mapped_column(String(50))


class AuditArtifact(Base):
    """A file an audit produced: report.json, maps.npz, one heatmap PNG per (method, test,
    stage, image)."""

    __tablename__ = "audit_artifacts"
    __table_args__ = (
        UniqueConstraint(
            "audit_id", "kind", "method", "test", "stage", "image", name="uq_audit_artifacts_key"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    audit_id: Mapped[str] = mapped_column(ForeignKey("audits.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(40))  # report_json | maps_npz | heatmap_png
    method: Mapped[str] = mapped_column(String(100), default="")
    test: Mapped[str] = mapped_column(String(100), default="")
    stage: Mapped[str] = mapped_column(String(300), default="")
    image: Mapped[str] = mapped_column(String(300), default="")
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    media_type: Mapped[str] = mapped_column(String(100))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
