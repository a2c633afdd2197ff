"""``preread draft``: real DICOM files to stored drafts, on Postgres and on SQLite."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image as PILImage
from sqlalchemy import create_engine, func, inspect, select

from preread.schemas.findings import DraftReport
from preread.schemas.tables import Image, Instance, Report, Series, Study, StudyState
from tests.conftest import testdata
from tests.support.procs import base_env, preread_argv


def run_preread(*args: str, **settings: object) -> subprocess.CompletedProcess[str]:
    """Run our console command as a user would."""
    return subprocess.run(preread_argv(*args), env=base_env(**settings), capture_output=True, text=True, timeout=600)


@pytest.fixture
def study_folder(tmp_path: Path) -> Path:
    """A folder with pydicom's real CT and MR test files, one corrupt file and one non-DICOM file."""
    folder = tmp_path / "in"
    (folder / "ct").mkdir(parents=True)
    (folder / "mr").mkdir()
    shutil.copy(testdata("CT_small.dcm"), folder / "ct" / "ct.dcm")
    shutil.copy(testdata("MR_small.dcm"), folder / "mr" / "mr.dcm")
    data = testdata("CT_small.dcm").read_bytes()
    (folder / "ct" / "truncated.dcm").write_bytes(data[: len(data) // 2])
    (folder / "notes.txt").write_text("not a DICOM file\n")
    return folder


def counts(url: str) -> dict[str, int]:
    engine = create_engine(url)
    with engine.connect() as conn:
        out = {t.__tablename__: conn.execute(select(func.count()).select_from(t)).scalar_one() for t in (Study, Series, Instance, Report)}
        out["current"] = conn.execute(select(func.count()).select_from(Report).where(Report.current.is_(True))).scalar_one()
    engine.dispose()
    return out


def test_draft_real_ct_and_mr_twice(db_url: str, study_folder: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = dict(database_url=db_url, data_dir=tmp_path / "data", model=tiny_model_dir, max_images=2)
    first = run_preread("draft", str(study_folder), "--json", **settings)
    assert first.returncode == 0, first.stderr
    drafts = json.loads(first.stdout)
    assert len(drafts) == 2
    assert "truncated.dcm" in first.stderr and "notes.txt" in first.stderr, "bad files are named"
    for draft in drafts:
        assert draft["raw_output"], "the raw model output is always kept"
        # schema-constrained decoding: even random weights give a draft that validates
        assert draft["parse_status"] == "ok"
        assert DraftReport.model_validate(draft["structured"]).impression
        for image in draft["images"]:
            with PILImage.open(image["path"]) as png:
                assert png.mode == "L", "CT and MR: 8-bit greyscale"
                assert png.size == (image["width"], image["height"])
    assert counts(db_url) == {"studies": 2, "series": 2, "instances": 2, "reports": 2, "current": 2}
    for phi in ("CompressedSamples", "1CT1", "4MR1"):  # the files' patient name and IDs
        assert phi not in first.stdout and phi not in first.stderr, "no patient data printed or logged"

    second = run_preread("draft", str(study_folder), **settings)
    assert second.returncode == 0, second.stderr
    after = counts(db_url)
    assert after == {"studies": 2, "series": 2, "instances": 2, "reports": 4, "current": 2}, "no duplicate study or instance"
    engine = create_engine(db_url)
    with engine.connect() as conn:
        for study_id, in conn.execute(select(Study.id)):
            rows = conn.execute(
                select(Report.id, Report.current).where(Report.study_id == study_id).order_by(Report.id)
            ).all()
            assert [current for _, current in rows] == [False, True], "the newer report is current, the older kept"
        assert set(conn.execute(select(Study.state)).scalars()) == {StudyState.DRAFTED}
        assert conn.execute(select(func.count()).select_from(Image)).scalar_one() >= 2
    engine.dispose()


def test_help_lists_subcommands() -> None:
    result = run_preread("--help")
    assert result.returncode == 0
    for command in ("draft", "db", "run", "worker", "status", "listen", "render"):
        assert command in result.stdout


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_db_upgrade_on_empty_database(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    url = request.getfixturevalue("pg_empty_url") if backend == "postgres" else f"sqlite:///{tmp_path / 'fresh' / 'new.db'}"
    result = run_preread("db", "upgrade", database_url=url)
    assert result.returncode == 0, result.stderr
    engine = create_engine(url)
    assert {"studies", "reports", "findings", "alembic_version"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_draft_with_nothing_readable_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 300)
    result = run_preread("draft", str(tmp_path), data_dir=tmp_path / "data", model=tmp_path / "no-model")
    assert result.returncode == 2
    assert "junk.dcm" in result.stderr and "no readable DICOM study" in result.stderr
