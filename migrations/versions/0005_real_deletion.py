"""real deletion: one live row per (tenant, sha256) instead of one row (tombstones may share
the bytes), dataset_files (which store files each live dataset uses), sha256 indexes for the
reference counts that decide whether a file may be removed

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 11:05:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LIVE = sa.text("deleted_at IS NULL")


def upgrade() -> None:
    for table in ("models", "datasets"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_constraint(f"uq_{table}_tenant_sha", type_="unique")
            batch_op.create_index(
                f"uq_{table}_tenant_sha_live",
                ["tenant_id", "sha256"],
                unique=True,
                postgresql_where=LIVE,
                sqlite_where=LIVE,
            )
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_models_sha256"), ["sha256"], unique=False)
    with op.batch_alter_table("audit_artifacts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_artifacts_sha256"), ["sha256"], unique=False)
    dataset_files = op.create_table(
        "dataset_files",
        sa.Column("dataset_id", sa.String(length=32), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["datasets.id"],
            name=op.f("fk_dataset_files_dataset_id_datasets"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_dataset_files_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("dataset_id", "sha256", name=op.f("pk_dataset_files")),
    )
    with op.batch_alter_table("dataset_files", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_dataset_files_sha256"), ["sha256"], unique=False)
        batch_op.create_index(batch_op.f("ix_dataset_files_tenant_id"), ["tenant_id"], unique=False)
    _backfill_dataset_files(dataset_files)


def _backfill_dataset_files(dataset_files: sa.Table) -> None:
    """Index the images and masks of the datasets that are live now. Datasets deleted before
    this revision count as tombstones: their files are left for the orphan sweep
    (:func:`saliency_audit.service.purge.remove_orphan_files`)."""
    datasets = sa.table(
        "datasets",
        sa.column("id", sa.String),
        sa.column("tenant_id", sa.String),
        sa.column("manifest", sa.JSON),
        sa.column("deleted_at", sa.DateTime),
    )
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(datasets.c.id, datasets.c.tenant_id, datasets.c.manifest).where(
            datasets.c.deleted_at.is_(None)
        )
    )
    for dataset_id, tenant_id, manifest in rows.all():
        files: set[str] = set()
        for item in (manifest or {}).get("images", []):
            files.update(item[key] for key in ("sha256", "mask_sha256") if item.get(key))
        if files:
            conn.execute(
                dataset_files.insert(),
                [{"dataset_id": dataset_id, "tenant_id": tenant_id, "sha256": f} for f in files],
            )


def downgrade() -> None:
    """Fails where a tombstone and a live row hold the same bytes: the old schema allowed one
    row per (tenant, sha256)."""
    with op.batch_alter_table("dataset_files", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dataset_files_tenant_id"))
        batch_op.drop_index(batch_op.f("ix_dataset_files_sha256"))
    op.drop_table("dataset_files")
    with op.batch_alter_table("audit_artifacts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_artifacts_sha256"))
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_models_sha256"))
    for table in ("datasets", "models"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(f"uq_{table}_tenant_sha_live")
            batch_op.create_unique_constraint(f"uq_{table}_tenant_sha", ["tenant_id", "sha256"])
