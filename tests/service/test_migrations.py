"""Alembic is the only way the schema changes: upgrade, downgrade and upgrade again on SQLite
and on PostgreSQL, and the migrated schema is exactly what the models declare."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from saliency_audit.service import db
from saliency_audit.service.models import Base
from tests.servers import PG_ADMIN_URL, _admin_connect

TABLES = {
    "dataset_files",
    "tenants",
    "api_keys",
    "models",
    "datasets",
    "audits",
    "results",
    "verdicts",
    "audit_artifacts",
    "audit_parts",
}


@pytest.fixture
def scratch_pg() -> Iterator[str]:
    name = f"sa_migrate_{secrets.token_hex(4)}"
    with _admin_connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].split("://", 1)[1]
    yield f"postgresql+psycopg://{base}/{name}"
    with _admin_connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def schema_differences(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))
    finally:
        engine.dispose()


def round_trip(url: str) -> None:
    db.upgrade(url)
    assert tables(url) == TABLES
    assert schema_differences(url) == []
    assert db.current_revision(url) is not None
    db.downgrade(url, "base")
    assert tables(url) == set()
    assert db.current_revision(url) is None
    db.upgrade(url)
    assert tables(url) == TABLES
    assert schema_differences(url) == []


def test_upgrade_downgrade_upgrade_on_sqlite(tmp_path: Path) -> None:
    round_trip(f"sqlite:///{tmp_path / 'db.sqlite'}")


def test_upgrade_downgrade_upgrade_on_postgres(scratch_pg: str) -> None:
    round_trip(scratch_pg)
