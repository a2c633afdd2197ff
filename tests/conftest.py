"""Shared fixtures: a fresh Postgres database per test run, SQLite files, real DICOM."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.support.studies import testdata

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: Admin URL of the Postgres server the integration tests use (trust auth on this machine).
PG_ADMIN_URL = os.environ.get("PREREAD_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("PREREAD_TEST_REDIS", "redis://127.0.0.1:6379/0")


def _create_pg_database(name: str) -> str:
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def _drop_pg_database(name: str) -> None:
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def pg_empty_url() -> Iterator[str]:
    """An empty, freshly created Postgres database; dropped afterwards."""
    name = f"preread_test_{uuid.uuid4().hex[:12]}"
    url = _create_pg_database(name)
    try:
        yield url
    finally:
        from preread.schemas.database import engine_for

        engine_for.cache_clear()
        _drop_pg_database(name)


@pytest.fixture
def pg_url(pg_empty_url: str) -> str:
    """A fresh Postgres database migrated to head."""
    from preread.schemas.database import upgrade

    upgrade(pg_empty_url)
    return pg_empty_url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A new SQLite file migrated to head (the embedded default)."""
    from preread.schemas.database import upgrade

    url = f"sqlite:///{tmp_path / 'preread.db'}"
    upgrade(url)
    return url


@pytest.fixture(params=["postgres", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test that takes this runs on Postgres and on SQLite."""
    return request.getfixturevalue("pg_url" if request.param == "postgres" else "sqlite_url")


__all__ = ["testdata"]  # tests import it from here; it lives with the other support helpers


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Qwen2.5-VL model folder (tests/tiny_model.py), built once per run."""
    from tests.support.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2.5-vl"))


testdata.__test__ = False  # a helper, not a test, when imported into a test module
