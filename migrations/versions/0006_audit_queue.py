"""audits: the broker queue an audit's message was sent to, so the fair claim of a worker on
one queue only picks audits sent to that queue; an index for a tenant's latest claim

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 11:15:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("audits", schema=None) as batch_op:
        batch_op.add_column(sa.Column("queue", sa.String(length=200), nullable=True))
        batch_op.create_index("ix_audits_tenant_started", ["tenant_id", "started_at"])


def downgrade() -> None:
    with op.batch_alter_table("audits", schema=None) as batch_op:
        batch_op.drop_index("ix_audits_tenant_started")
        batch_op.drop_column("queue")
