"""reports and webhooks: tenant webhook secret, audit document and webhook delivery state

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 19:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("webhook_secret", sa.String(length=100), nullable=True))
    with op.batch_alter_table("audits", schema=None) as batch_op:
        batch_op.add_column(sa.Column("documents_state", sa.String(length=20), nullable=True))
        batch_op.add_column(sa.Column("documents_error", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("webhook_url", sa.String(length=2000), nullable=True))
        batch_op.add_column(sa.Column("webhook_state", sa.String(length=20), nullable=True))
        batch_op.add_column(
            sa.Column("webhook_attempts", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("webhook_error", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audits", schema=None) as batch_op:
        for column in (
            "webhook_error",
            "webhook_attempts",
            "webhook_state",
            "webhook_url",
            "documents_error",
            "documents_state",
        ):
            batch_op.drop_column(column)
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("webhook_secret")
