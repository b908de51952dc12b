"""Alembic environment: the URL comes from the config that
:func:`saliency_audit.service.db.alembic_config`
builds (``saliency-audit db upgrade``), never from a file checked into the repository."""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

from saliency_audit.service.models import Base

config = context.config
target_metadata = Base.metadata


def run_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connectable = engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    with connectable.connect() as connection:
        # batch mode lets ALTER TABLE work on SQLite (it copies the table)
        context.configure(
            connection=connection, target_metadata=target_metadata, render_as_batch=True
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
