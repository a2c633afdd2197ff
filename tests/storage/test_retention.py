"""Retention cleanup: exactly the old files go, every row stays, and a listener at 0xA700 takes C-STOREs again.

The data dir lives on a private tmpfs so that free space is exact and nothing else writes there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from tests.support.listener import ROOT, clone_series, make_listener, needs_dcmtk, storescu, wait_for
from tests.support.studies import testdata
from tests.support.synthetic import ct_series, projection, save

MiB = 1024 * 1024


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs of our own (needs root: mount)."""
    where = tmp_path / "mnt"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "preread.cli.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _free(path: Path) -> int:
    return shutil.disk_usage(path).free


@needs_dcmtk
def test_cleanup_removes_exactly_old_files_keeps_rows_and_frees_the_listener(tmp_path: Path, tmpfs: Path, pg_url: str) -> None:
    from sqlalchemy import create_engine, text

    from preread.schemas.settings import Settings
    from preread.worker.pipeline.stages import BadInput, render_step

    old_uid, new_uid, busy_uid = generate_uid(), generate_uid(), generate_uid()
    src = tmp_path / "src"
    old_files = ct_series(src / "old", study_uid=old_uid, n=40, series_number=1, rows=512, columns=512)
    new_files = [save(projection(study_uid=new_uid, series_uid=generate_uid(), series_number=1, instance_number=1,
                                 view="PA"), src / "new")]
    busy_files = ct_series(src / "busy", study_uid=busy_uid, n=2, series_number=1)

    lp = make_listener(tmpfs, pg_url, PREREAD_MIN_FREE_BYTES="0", PREREAD_STABLE_AFTER="600")
    lp.log_path = tmp_path / "listener.log"
    lp.start()
    try:
        for files in (old_files, new_files, busy_files):
            assert storescu(lp.port, files).returncode == 0
    finally:
        lp.stop()
    data = lp.data_dir

    # the old study was drafted long ago (a report, a finding, probe scores, a PNG); the busy one is old but RENDERED
    engine = create_engine(pg_url)
    long_ago = "now() - interval '40 days'"
    with engine.begin() as conn:
        ids = dict(conn.execute(text("select study_instance_uid, id from studies")).all())
        conn.execute(text(f"update studies set state = 'DRAFTED', last_received_at = {long_ago} where id = :i"), dict(i=ids[old_uid]))
        conn.execute(text(f"update studies set state = 'RENDERED', last_received_at = {long_ago} where id = :i"), dict(i=ids[busy_uid]))
        conn.execute(text("update studies set state = 'DRAFTED' where id = :i"), dict(i=ids[new_uid]))
        for uid in (old_uid, new_uid):
            png = data / "images" / uid / "0000.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            png.write_bytes(b"\x89PNG fake")
            conn.execute(text("insert into images (study_id, sop_instance_uid, frame, ordinal, path, width, height, created_at) "
                              "values (:s, :u, 0, 0, :p, 8, 8, now())"), dict(s=ids[uid], u=generate_uid(), p=str(png)))
            report = conn.execute(text(
                "insert into reports (study_id, current, raw_output, parse_status, model_id, prompt_version, mode, "
                "n_images, created_at) values (:s, true, '{}', 'ok', 'tiny', 'v1', 'json', 1, now()) returning id"),
                dict(s=ids[uid])).scalar_one()
            conn.execute(text("insert into findings (report_id, ordinal, text) values (:r, 0, 'clear lungs')"), dict(r=report))
            conn.execute(text("insert into probe_scores (study_id, condition, question, score, current, model_id, "
                              "prompt_version, created_at) values (:s, 'pneumothorax', 'q?', 0.1, true, 'tiny', 'v1', now())"),
                         dict(s=ids[uid]))
    counts_before = {t: engine.connect().execute(text(f"select count(*) from {t}")).scalar_one()
                     for t in ("studies", "series", "instances", "images", "reports", "findings", "probe_scores")}
    quarantine = data / "quarantine"
    quarantine.mkdir(exist_ok=True)
    stale, fresh = quarantine / "old.dcm", quarantine / "new.dcm"
    stale.write_bytes(b"x" * 1000)
    fresh.write_bytes(b"y" * 1000)
    forty_days = time.time() - 40 * 86400
    os.utime(stale, (forty_days, forty_days))

    def files_of(uid: str) -> set[Path]:
        return {p for p in data.rglob("*") if p.is_file() and uid in p.parts}

    before = {uid: files_of(uid) for uid in (old_uid, new_uid, busy_uid)}
    assert len(before[old_uid]) == 41 and before[new_uid] and before[busy_uid]

    # the listener now starts below its watermark (which the old study's files hold up): it refuses every
    # new association (local limit exceeded), C-ECHO too, so it is "up" once it logs that it listens
    watermark = _free(tmpfs) + 4 * MiB
    lp.env.update(PREREAD_MIN_FREE_BYTES=str(watermark))
    started_before = lp.log().count("listening as")
    lp.start(wait=False)
    wait_for(lambda: lp.alive() and lp.log().count("listening as") > started_before, timeout=60, what="listener up")
    probe_files = clone_series(testdata("CT_small.dcm"), tmp_path / "probe", 1)
    try:
        assert storescu(lp.port, probe_files).returncode != 0
        assert "free space below watermark" in lp.log()
        probe_sop = _sop(probe_files[0])
        assert lp.query("select count(*) from instances where sop_instance_uid = :u", u=probe_sop)[0][0] == 0

        env = dict(lp.env, PREREAD_RETENTION_DAYS="30")
        dry = _cli(env, "cleanup", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert old_uid in dry.stdout and new_uid not in dry.stdout and busy_uid not in dry.stdout
        assert {uid: files_of(uid) for uid in before} == before and stale.exists()

        done = _cli(env, "cleanup")
        assert done.returncode == 0, done.stderr
        assert files_of(old_uid) == set() and not stale.exists()
        assert files_of(new_uid) == before[new_uid] and files_of(busy_uid) == before[busy_uid] and fresh.exists()

        # every row stays; the study says when its files went; the run says what it freed
        counts_after = {t: engine.connect().execute(text(f"select count(*) from {t}")).scalar_one() for t in counts_before}
        assert counts_after == counts_before
        removed = lp.query("select files_removed_at, files_removed_bytes from studies where study_instance_uid = :u", u=old_uid)[0]
        assert removed.files_removed_at is not None and removed.files_removed_bytes > 40 * 512 * 512 * 2
        run = lp.query("select reason, studies, files, bytes_freed from cleanup_runs")
        assert len(run) == 1 and run[0].reason == "age" and run[0].studies == 1 and run[0].files == 42
        assert lp.query("select count(*) from studies where files_removed_at is not null")[0][0] == 1

        shown = _cli(env, "status")
        assert shown.returncode == 0, shown.stderr
        assert "disk: " in shown.stdout and "last cleanup (age)" in shown.stdout and "1 studies, 42 files" in shown.stdout

        # the same listener, without a restart, takes C-STOREs again
        accepted = storescu(lp.port, probe_files)
        assert accepted.returncode == 0
        assert lp.query("select count(*) from instances where sop_instance_uid = :u", u=probe_sop)[0][0] == 1
    finally:
        lp.stop()

    # reprocessing the cleaned study fails clearly, naming what was removed and when
    settings = Settings(data_dir=data, database_url=pg_url, retention_days=30)
    with engine.begin() as conn:
        conn.execute(text("update studies set state = 'STABLE' where id = :i"), dict(i=ids[old_uid]))
    with pytest.raises(BadInput, match=r"40 stored instances and 1 PNGs .* removed by retention cleanup on \d{4}-\d\d-\d\d"):
        render_step(settings, ids[old_uid])

    from preread.ingest.storage.retention import status_lines

    lines = status_lines(settings)
    assert lines[0].startswith("disk: ") and "retention: 30 days" in lines
    assert any(line.startswith("last cleanup (age)") and "1 studies, 42 files" in line for line in lines)
    engine.dispose()


def _sop(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_cleanup_without_retention_is_refused_and_deletes_nothing(tmp_path: Path, sqlite_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREREAD_")}
    env.update(PREREAD_DATA_DIR=str(tmp_path), PREREAD_DATABASE_URL=sqlite_url)
    kept = tmp_path / "quarantine" / "x.dcm"
    kept.parent.mkdir()
    kept.write_bytes(b"x")
    os.utime(kept, (0, 0))
    done = _cli(env, "cleanup")
    assert done.returncode == 2
    assert "PREREAD_RETENTION_DAYS" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert kept.exists()


def test_space_pass_takes_oldest_finished_first_until_twice_the_watermark(tmp_path: Path, tmpfs: Path, sqlite_url: str) -> None:
    """Under twice the watermark, younger finished studies go too, oldest first, and only as many as needed."""
    from sqlalchemy import create_engine, text

    from preread.ingest.storage import retention
    from preread.schemas.settings import Settings

    data = tmpfs / "data"
    engine = create_engine(sqlite_url)
    uids = [generate_uid() for _ in range(3)]
    with engine.begin() as conn:
        for age, uid in enumerate(uids):  # uids[0] is the newest
            study = conn.execute(text(
                "insert into studies (study_instance_uid, source, state, state_changed_at, priority, attempts, "
                "first_received_at, last_received_at, created_at, updated_at) values (:u, 'listener', 'DRAFTED', "
                ":t, 0, 0, :t, :t, :t, :t) returning id"), dict(u=uid, t=retention.utcnow() - timedelta(hours=age + 1))).scalar_one()
            series = conn.execute(text("insert into series (study_id, series_instance_uid, created_at) values (:s, :u, :t) returning id"),
                                  dict(s=study, u=generate_uid(), t=retention.utcnow())).scalar_one()
            path = data / "studies" / uid / "s" / "i.dcm"
            path.parent.mkdir(parents=True)
            path.write_bytes(b"\0" * 8 * MiB)
            conn.execute(text("insert into instances (series_id, sop_instance_uid, sop_class_uid, number_of_frames, path, "
                              "size_bytes, received_at) values (:s, :u, '1.2', 1, :p, :n, :t)"),
                         dict(s=series, u=generate_uid(), p=str(path), n=8 * MiB, t=retention.utcnow() - timedelta(days=1)))
    # free space is under twice the watermark; freeing two 8 MiB studies brings it back above
    watermark = (_free(tmpfs) + 12 * MiB) // 2
    settings = Settings(data_dir=data, database_url=sqlite_url, retention_days=365, min_free_bytes=watermark)
    assert retention.due(settings) == "space"
    result = retention.run_if_due(settings)  # what the coordinator calls
    assert result is not None and result.reason == "space"
    assert result.studies == [uids[2], uids[1]]
    assert not (data / "studies" / uids[2]).exists() and not (data / "studies" / uids[1]).exists()
    assert (data / "studies" / uids[0] / "s" / "i.dcm").exists()
    assert retention.due(settings) == "age"  # no age pass has run yet, and space is fine now
    engine.dispose()


def test_held_and_unfinished_studies_are_never_eligible(db_url: str) -> None:
    """Pending deliveries, open sweeps and unfinished states keep a study's files."""
    from sqlalchemy import update

    from preread.ingest.storage.retention import eligible
    from preread.schemas.database import session_scope
    from preread.schemas.tables import (
        Delivery,
        DeliveryState,
        Report,
        Study,
        Sweep,
        SweepState,
        SweepStudy,
        SweepStudyState,
        utcnow,
    )

    old = utcnow() - timedelta(days=90)
    ids: dict[str, int] = {}
    with session_scope(db_url) as session:
        for name, state in [("receiving", "RECEIVING"), ("stable", "STABLE"), ("rendered", "RENDERED"),
                            ("delivering", "DRAFTED"), ("swept", "EXPORTED"), ("free", "FAILED")]:
            study = Study(study_instance_uid=generate_uid(), state=state, last_received_at=old)
            session.add(study)
            session.flush()
            ids[name] = study.id
    with session_scope(db_url) as session:
        before = utcnow()
        assert [i for i, _ in eligible(session, before=before)] == sorted(
            [ids["delivering"], ids["swept"], ids["free"]])
        swept_uid = session.get(Study, ids["swept"]).study_instance_uid  # type: ignore[union-attr]
        reports = {}
        for name in ("delivering", "free"):
            report = Report(study_id=ids[name], current=True, raw_output="{}", parse_status="ok", model_id="m",
                            prompt_version="v1")
            session.add(report)
            session.flush()
            reports[name] = report.id
        session.add(Delivery(report_id=reports["delivering"], study_id=ids["delivering"], destination="pacs",
                             kind="dicom", state=DeliveryState.PENDING))
        session.add(Delivery(report_id=reports["free"], study_id=ids["free"], destination="pacs", kind="dicom",
                             state=DeliveryState.DELIVERED))
        sweep = Sweep(source="pacs", date_from=old.date(), date_to=old.date(), state=SweepState.PAUSED)
        session.add(sweep)
        session.flush()
        session.add(SweepStudy(sweep_id=sweep.id, study_instance_uid=swept_uid, state=SweepStudyState.RELEASED))
    with session_scope(db_url) as session:
        assert [i for i, _ in eligible(session, before=utcnow())] == [ids["free"]]
        session.execute(update(Delivery).values(state=DeliveryState.DELIVERED))
        session.execute(update(Sweep).values(state=SweepState.DONE))
    with session_scope(db_url) as session:
        assert sorted(i for i, _ in eligible(session, before=utcnow())) == sorted(
            [ids["delivering"], ids["swept"], ids["free"]])
        assert eligible(session, before=old) == []  # none older than its last instance
