"""The Alembic migrations produce exactly the models' schema, on Postgres and SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from preread.schemas.database import upgrade
from preread.schemas.tables import Base


def _diff(url: str) -> list:
    engine = create_engine(url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": False})
        diff = compare_metadata(ctx, Base.metadata)
    engine.dispose()
    return diff


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_migrations_match_models(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    url = request.getfixturevalue("pg_empty_url") if backend == "postgres" else f"sqlite:///{tmp_path / 'new.db'}"
    upgrade(url)
    assert _diff(url) == []
    tables = set(inspect(create_engine(url)).get_table_names())
    assert {"studies", "series", "instances", "images", "reports", "findings", "probe_scores", "outbox"} <= tables


def test_upgrade_is_repeatable(sqlite_url: str) -> None:
    upgrade(sqlite_url)  # a second run on an up-to-date database changes nothing
    assert _diff(sqlite_url) == []
