"""audit parts: a split audit's shares of work, claimed by any worker

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 19:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_parts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("audit_id", sa.String(length=32), nullable=False),
        sa.Column("part_index", sa.Integer(), nullable=False),
        sa.Column("methods", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("result_sha256", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["audit_id"],
            ["audits.id"],
            name=op.f("fk_audit_parts_audit_id_audits"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_audit_parts_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_parts")),
        sa.UniqueConstraint("audit_id", "part_index", name="uq_audit_parts_key"),
    )
    with op.batch_alter_table("audit_parts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_parts_audit_id"), ["audit_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_parts_tenant_id"), ["tenant_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("audit_parts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_parts_tenant_id"))
        batch_op.drop_index(batch_op.f("ix_audit_parts_audit_id"))
    op.drop_table("audit_parts")
