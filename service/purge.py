"""Real deletion: rows go, and a file of the store goes with the last row that needs it.

The store is content-addressed (:mod:`saliency_audit.service.artifacts`): two uploads, two tenants
or two
audits may share one file, so a file is removed only when a query over every column that names
a file finds no row left: live models, the images and masks of live datasets
(``dataset_files``), audit artifacts, reports, maps and part results. Rows are deleted in one
transaction first; files are removed after it committed, so a failed transaction never leaves
a row without its file.

Finished audits are evidence: deleting a model or dataset they used keeps them (and the model
or dataset row as a *tombstone*: ``deleted_at`` set, metadata kept, file removed) unless the
caller asks for ``cascade``, which deletes those audits too. A tombstone goes once no audit
names it. The docs' "Deletion" section (docs/service.md) is the user-facing account.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import delete, or_, select, union
from sqlalchemy.orm import Session

from .artifacts import ArtifactStore
from .db import Database
from .models import (
    ApiKey,
    Audit,
    AuditArtifact,
    AuditPart,
    DatasetFile,
    DatasetRecord,
    ModelRecord,
    ResultRow,
    Tenant,
    VerdictRow,
    manifest_files,
    utcnow,
)

log = logging.getLogger(__name__)
CHUNK = 500  # ids or hashes per IN (...) list
T = TypeVar("T")


@dataclass
class Deleted:
    """What one deletion removed: rows by kind, rows kept as tombstones, files and bytes."""

    audits: int = 0
    models: int = 0
    datasets: int = 0
    tombstones: int = 0
    files: int = 0
    bytes_freed: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(vars(self))


def _chunks(items: Iterable[T]) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == CHUNK:
            yield batch
            batch = []
    if batch:
        yield batch


def referenced(session: Session, files: Iterable[str]) -> set[str]:
    """The files among ``files`` that some row (of any tenant) still needs."""
    found: set[str] = set()
    for chunk in _chunks(sorted(set(files))):
        needed: Any = union(
            select(ModelRecord.sha256).where(
                ModelRecord.sha256.in_(chunk), ModelRecord.deleted_at.is_(None)
            ),
            select(DatasetFile.sha256).where(DatasetFile.sha256.in_(chunk)),
            select(AuditArtifact.sha256).where(AuditArtifact.sha256.in_(chunk)),
            select(Audit.report_sha256).where(Audit.report_sha256.in_(chunk)),
            select(Audit.maps_sha256).where(Audit.maps_sha256.in_(chunk)),
            select(AuditPart.result_sha256).where(AuditPart.result_sha256.in_(chunk)),
        )
        found.update(session.execute(needed).scalars())
    return found


def remove_unreferenced(
    db: Database, store: ArtifactStore, candidates: Iterable[str], deleted: Deleted | None = None
) -> Deleted:
    """Remove the candidates no row needs any more (after the rows' deletion committed)."""
    deleted = deleted if deleted is not None else Deleted()
    candidates = set(candidates)
    with db.session() as session:
        keep = referenced(session, candidates)
    for sha in sorted(candidates - keep):
        size = store.delete(sha)
        if size is not None:
            deleted.files += 1
            deleted.bytes_freed += size
    # the only record a deletion leaves: ids and counts, never content
    log.info("deleted: %s", deleted.to_dict())
    return deleted


def audit_files(session: Session, audit_ids: Sequence[str]) -> set[str]:
    files: set[str] = set()
    for chunk in _chunks(audit_ids):
        files.update(
            session.scalars(select(AuditArtifact.sha256).where(AuditArtifact.audit_id.in_(chunk)))
        )
        files.update(
            sha
            for sha in session.scalars(
                select(AuditPart.result_sha256).where(AuditPart.audit_id.in_(chunk))
            )
            if sha
        )
        for report, maps in session.execute(
            select(Audit.report_sha256, Audit.maps_sha256).where(Audit.id.in_(chunk))
        ):
            files.update(sha for sha in (report, maps) if sha)
    return files


def delete_audits(session: Session, audit_ids: Sequence[str], deleted: Deleted) -> set[str]:
    """Delete the audits and every row of theirs; returns the files they named. A model or
    dataset tombstone that no audit names any more goes too."""
    if audit_ids:
        more = " ..." if len(audit_ids) > 20 else ""
        log.info("deleting %d audits: %s%s", len(audit_ids), ", ".join(audit_ids[:20]), more)
    files = audit_files(session, audit_ids)
    used_models: set[str] = set()
    used_datasets: set[str] = set()
    for chunk in _chunks(audit_ids):
        for model_id, dataset_id, train_id in session.execute(
            select(Audit.model_id, Audit.dataset_id, Audit.train_dataset_id).where(
                Audit.id.in_(chunk)
            )
        ):
            used_models.add(model_id)
            used_datasets.update(d for d in (dataset_id, train_id) if d)
        # the foreign keys cascade too; deleting explicitly does not depend on it
        for child in (ResultRow, VerdictRow, AuditArtifact, AuditPart):
            session.execute(delete(child).where(child.audit_id.in_(chunk)))
        gone = session.execute(delete(Audit).where(Audit.id.in_(chunk)))
        deleted.audits += gone.rowcount  # type: ignore[attr-defined]
    session.flush()
    for model in _unused_tombstones(session, ModelRecord, used_models):
        files.add(model.sha256)
        session.delete(model)
        deleted.models += 1
    for dataset in _unused_tombstones(session, DatasetRecord, used_datasets):
        files.update(manifest_files(dataset.manifest))
        session.delete(dataset)
        deleted.datasets += 1
    return files


def _unused_tombstones(session: Session, model: Any, ids: set[str]) -> list[Any]:
    rows = []
    for row_id in sorted(ids):
        row = session.get(model, row_id)
        if row is not None and row.deleted_at is not None and not _audits_naming(session, row):
            rows.append(row)
    return rows


def _audits_naming(session: Session, row: ModelRecord | DatasetRecord) -> list[str]:
    """The ids of the audits that name this model or dataset (as audit or training set)."""
    if isinstance(row, ModelRecord):
        where = Audit.model_id == row.id
    else:
        where = or_(Audit.dataset_id == row.id, Audit.train_dataset_id == row.id)
    return list(session.scalars(select(Audit.id).where(where)))


def delete_upload(
    session: Session, row: ModelRecord | DatasetRecord, cascade: bool, deleted: Deleted
) -> set[str]:
    """Delete a model or dataset (the caller refused it while audits of it are active).

    Without ``cascade``, finished audits that used it keep it as a tombstone; with it, they
    are deleted first. Returns the files to remove once this transaction committed."""
    audits = _audits_naming(session, row)
    log.info("deleting %s %s (cascade=%s)", type(row).__tablename__, row.id, cascade)
    files = set()
    if cascade and audits:
        files |= delete_audits(session, audits, deleted)
        audits = []
    files |= {row.sha256} if isinstance(row, ModelRecord) else manifest_files(row.manifest)
    if audits:
        row.deleted_at = utcnow()  # the dataset's files leave dataset_files on this update
        deleted.tombstones += 1
    else:
        if isinstance(row, DatasetRecord):
            session.execute(delete(DatasetFile).where(DatasetFile.dataset_id == row.id))
        session.delete(row)
    if isinstance(row, ModelRecord):
        deleted.models += 1
    else:
        deleted.datasets += 1
    session.flush()
    return files


def purge_tenant(
    db: Database, store: ArtifactStore, tenant_name: str, drop_tenant: bool = False
) -> Deleted:
    """Delete every audit, model and dataset of a tenant (tombstones included), and the files
    no other tenant's rows need. The tenant and its API keys stay unless ``drop_tenant``.

    Audits still queued or running are deleted too: their worker loses ownership at its next
    heartbeat and stops; files it stored meanwhile are left to :func:`remove_orphan_files`.
    Raises LookupError for an unknown tenant."""
    deleted = Deleted()
    with db.session() as session:
        tenant = session.scalars(select(Tenant).where(Tenant.name == tenant_name)).one_or_none()
        if tenant is None:
            raise LookupError(f"no tenant {tenant_name!r}")
        log.info("purging tenant %s (%s), drop_tenant=%s", tenant.name, tenant.id, drop_tenant)
        audit_ids = list(session.scalars(select(Audit.id).where(Audit.tenant_id == tenant.id)))
        files = delete_audits(session, audit_ids, deleted)
        for model in session.scalars(select(ModelRecord).where(ModelRecord.tenant_id == tenant.id)):
            files.add(model.sha256)
            session.delete(model)
            deleted.models += 1
        for dataset in session.scalars(
            select(DatasetRecord).where(DatasetRecord.tenant_id == tenant.id)
        ):
            files |= manifest_files(dataset.manifest)
            session.delete(dataset)
            deleted.datasets += 1
        session.execute(delete(DatasetFile).where(DatasetFile.tenant_id == tenant.id))
        if drop_tenant:
            session.execute(delete(ApiKey).where(ApiKey.tenant_id == tenant.id))
            session.delete(tenant)
    return remove_unreferenced(db, store, files, deleted)


def remove_orphan_files(
    db: Database, store: ArtifactStore, older_than_s: float = 3600.0
) -> Deleted:
    """Remove the store's files that no row needs and that are older than ``older_than_s``
    (younger ones may belong to an upload or audit whose rows are not committed yet): what
    deletions before real deletion left behind, and what a purged audit's worker wrote."""
    cutoff = time.time() - older_than_s
    deleted = Deleted()
    for chunk in _chunks(sha for sha, stat in store.stored() if stat.st_mtime < cutoff):
        remove_unreferenced(db, store, chunk, deleted)
    return deleted
