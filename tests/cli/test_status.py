"""``preread status`` names the data dir and database it reads, and never creates or migrates anything."""

from __future__ import annotations

import subprocess
from pathlib import Path

from sqlalchemy import create_engine, inspect

from tests.support.procs import base_env, preread_argv


def status(cwd: Path, **settings: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(preread_argv("status"), env=base_env(**settings), cwd=cwd, capture_output=True, text=True, timeout=300)


def test_status_in_an_empty_folder_creates_nothing(tmp_path: Path) -> None:
    result = status(tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"no database at {tmp_path / 'preread-data' / 'preread.db'}" in result.stderr
    assert "Traceback" not in result.stderr
    assert f"data dir: {tmp_path / 'preread-data'}" in result.stdout
    assert list(tmp_path.iterdir()) == [], "no ./preread-data, nothing at all"


def test_status_names_its_sources(tmp_path: Path) -> None:
    data = tmp_path / "data"
    up = subprocess.run(preread_argv("db", "upgrade"), env=base_env(data_dir=data), capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = status(elsewhere, data_dir=data)
    assert result.returncode == 0, result.stderr
    assert f"data dir: {data} (PREREAD_DATA_DIR)" in result.stdout
    assert f"database: sqlite:///{data / 'preread.db'}" in result.stdout
    assert "Studies" in result.stdout
    assert list(elsewhere.iterdir()) == []


def test_status_does_not_migrate_and_masks_the_password(pg_empty_url: str, tmp_path: Path) -> None:
    # trust authentication ignores the password: the connection works, the password must still not show
    url = pg_empty_url.replace("postgres@", "postgres:hunter2-pw@")
    result = status(tmp_path, database_url=url, data_dir=tmp_path / "data")
    assert result.returncode == 2, result.stderr
    assert "has no preread tables" in result.stderr and "preread db upgrade" in result.stderr
    assert "postgres:***@" in result.stdout
    assert "hunter2-pw" not in result.stdout + result.stderr
    engine = create_engine(pg_empty_url)
    try:
        assert inspect(engine).get_table_names() == [], "status migrated nothing"
    finally:
        engine.dispose()
    assert not (tmp_path / "data").exists()
