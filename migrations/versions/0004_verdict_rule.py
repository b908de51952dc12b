"""verdicts: the rule's FAIL-side bound and direction (fail_threshold, pass_when), as in
report.json's Verdict

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 10:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("verdicts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fail_threshold", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("pass_when", sa.String(length=20), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("verdicts", schema=None) as batch_op:
        batch_op.drop_column("pass_when")
        batch_op.drop_column("fail_threshold")
