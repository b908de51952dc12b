"""``/v1/datasets``: image sets as a zip or tar archive.

Images at the archive's root are an audit set; one folder of images per class makes a labeled
set (a training set for the data randomization test); ``masks/`` and ``boxes.json`` add
localization ground truth. Every member is checked before anything is stored
(:func:`saliency_audit.service.uploads.read_dataset_archive`): a rejected archive leaves no trace.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flask import Blueprint, jsonify, url_for
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from .. import purge
from ..app import state
from ..artifacts import Received
from ..models import Audit, DatasetRecord, utcnow
from ..problems import ApiError
from ..quotas import check_stored_bytes
from ..uploads import ArchiveLimits, read_dataset_archive
from .common import (
    check_keys,
    checked_name,
    existing_upload,
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
from .models import cascade_arg

bp = Blueprint("datasets", __name__, url_prefix="/v1/datasets")
METADATA_KEYS = {"name", "purpose"}
TRAINING_MAX_IMAGES = 100_000


def render(row: DatasetRecord, with_images: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": row.id,
        "name": row.name,
        "sha256": row.sha256,
        "size_bytes": row.size_bytes,
        "n_images": row.n_images,
        "labeled": row.labeled,
        "class_names": row.class_names,
        "has_masks": row.has_masks,
        "has_boxes": row.has_boxes,
        "skipped": list((row.manifest or {}).get("skipped", [])),
        "created_at": iso(row.created_at),
        "links": {"self": url_for("datasets.get_dataset", dataset_id=row.id)},
    }
    if with_images:
        body["images"] = [
            {k: item.get(k) for k in ("name", "sha256", "label", "width", "height")}
            for item in row.manifest["images"]
        ]
    return body


def check_storage(session: Any, size_bytes: int) -> None:
    """507 ``storage_quota_exceeded`` when this archive would take the tenant past its
    stored-bytes limit (:mod:`saliency_audit.service.quotas`; a dataset counts its archive's
    size)."""
    check_stored_bytes(session, state().config, tenant_id(), size_bytes)


@bp.post("")
def upload_dataset() -> Any:
    st = state()
    upload = file_part()
    meta = metadata_part()
    check_keys(meta, METADATA_KEYS, "dataset metadata")
    purpose = meta.get("purpose", "audit")
    if purpose not in ("audit", "training"):
        raise ApiError(422, "invalid_metadata", "metadata.purpose must be 'audit' or 'training'")
    limits = ArchiveLimits()
    if purpose == "training":
        limits = dataclasses.replace(limits, max_images=TRAINING_MAX_IMAGES)
    filename = checked_name(upload.filename or "dataset", "the file name")
    name = checked_name(str(meta.get("name") or filename)[:300], "metadata.name")
    received = receive_upload(upload, st.config.max_dataset_bytes)
    staged: list[Received] = []

    def stage(member: str, data: bytes) -> str:
        staged.append(st.store.stage_bytes(data))
        return staged[-1].sha256

    try:
        with st.db.session() as session:
            existing = existing_upload(session, DatasetRecord, received.sha256)
            if existing is not None:
                return upload_response(render(existing), 200)
            check_storage(session, received.size)
        # images are staged once the whole archive has been checked, and enter the store only
        # once the row is accepted
        manifest = read_dataset_archive(received.path, filename, sink=stage, limits=limits)
        try:
            with st.db.session() as session:
                row = session.scalars(
                    select(DatasetRecord).where(
                        DatasetRecord.tenant_id == tenant_id(),
                        DatasetRecord.sha256 == received.sha256,
                        DatasetRecord.deleted_at.is_(None),  # a tombstone is never revived
                    )
                ).one_or_none() or DatasetRecord(tenant_id=tenant_id(), sha256=received.sha256)
                row.name = name
                row.size_bytes = received.size
                row.n_images = manifest.n_images
                row.labeled = manifest.labeled
                row.has_masks = manifest.has_masks
                row.has_boxes = manifest.has_boxes
                row.class_names = manifest.class_names
                row.manifest = manifest.to_dict()
                row.created_at = utcnow()
                row.deleted_at = None
                session.add(row)
                session.flush()
                body = render(row)
                for image in staged:
                    st.store.commit(image)
        except IntegrityError:
            return race_winner(DatasetRecord, received.sha256, render)
    finally:
        # the archive itself is not kept: its members are, by sha256 (staged members not
        # committed are dropped)
        st.store.discard(received)
        for image in staged:
            st.store.discard(image)
    return upload_response(body, 201)


@bp.get("")
def list_datasets() -> Any:
    with state().db.session() as session:
        query = live_rows(DatasetRecord)
        return jsonify(paginated(session, query, render, "datasets.list_datasets"))


@bp.get("/<dataset_id>")
def get_dataset(dataset_id: str) -> Any:
    with state().db.session() as session:
        row = get_owned(session, DatasetRecord, dataset_id, "dataset")
        return jsonify(render(row, with_images=True))


@bp.delete("/<dataset_id>")
def delete_dataset(dataset_id: str) -> Any:
    """Delete the dataset and the images and masks no other live dataset (of any tenant) uses.
    Refused while an audit using it is queued or running; finished audits keep it as a
    tombstone (manifest kept, images gone) unless ``?cascade=true`` deletes them too."""
    st = state()
    cascade = cascade_arg()
    with st.db.session() as session:
        row = get_owned(session, DatasetRecord, dataset_id, "dataset")
        active = session.scalars(
            select(Audit.id).where(
                (Audit.dataset_id == row.id) | (Audit.train_dataset_id == row.id),
                Audit.state.in_(("queued", "running")),
            )
        ).all()
        if active:
            raise ApiError(
                409,
                "dataset_in_use",
                f"{len(active)} audits using this dataset are queued or running; cancel them first",
                audits=list(active),
            )
        files = purge.delete_upload(session, row, cascade, purge.Deleted())
    purge.remove_unreferenced(st.db, st.store, files)
    return "", 204
