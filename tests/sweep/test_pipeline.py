"""Sweeps end to end: Orthanc as the PACS, our listener, coordinator and workers as processes, the tiny model.

``preread sweep run`` creates the sweep and follows it; the coordinator
queries Orthanc, has it C-MOVE the studies to our listener, checks the
counts and releases them to the workers, which draft them.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select

from preread.schemas.tables import Instance, Outbox, Report, Study, StudyState, Sweep, SweepStudy
from tests.pipeline.test_queue import Pipeline, redis_server  # noqa: F401  (fixture)
from tests.support.orthanc import ORTHANC, Orthanc
from tests.support.procs import RedisServer, processes, wait_until
from tests.sweep.helpers import DAY1, DAY2, make_study, three_dates

pytestmark = [pytest.mark.slow, pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed")]


def sources_file(tmp: Path, orthanc: Orthanc, **extra: object) -> Path:
    lines = ["[[sources]]", 'name = "pacs"', 'kind = "dicom"', f'ae_title = "{orthanc.aet}"', 'host = "127.0.0.1"',
             f"port = {orthanc.dicom_port}"]
    lines += [f"{k} = {v!r}" if isinstance(v, int) else f'{k} = "{v}"' for k, v in extra.items()]
    path = tmp / "preread.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def sweep_cli(pipe: Pipeline, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    from tests.support.procs import preread_argv

    return subprocess.run(preread_argv("sweep", *args), env=pipe.env, capture_output=True, text=True, timeout=timeout)


def query(url: str, stmt):  # type: ignore[no-untyped-def]
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(stmt).all()
    finally:
        engine.dispose()


def reports_by_uid(url: str) -> dict[str, tuple[int, int]]:
    """Study Instance UID -> (reports, current reports)."""
    rows = query(url, select(Study.study_instance_uid, func.count(Report.id),
                             func.count(Report.id).filter(Report.current.is_(True)))
                 .outerjoin(Report, Report.study_id == Study.id).group_by(Study.study_instance_uid))
    return {uid: (n, cur) for uid, n, cur in rows}


def test_sweep_drafts_the_two_dates_then_nothing_new_then_again_with_force(
    tmp_path: Path, pg_url: str, redis_server: RedisServer, tiny_model_dir: Path  # noqa: F811
) -> None:
    studies = three_dates(tmp_path / "in", per_day=2)
    wanted = {uid for day in (DAY1, DAY2) for uid, _ in studies[day]}
    with processes() as started:
        pipe = Pipeline(tmp_path, pg_url, redis_server.url, tiny_model_dir, started)
        orthanc = Orthanc(tmp_path, peers={"PREREAD": ("127.0.0.1", pipe.port)})
        orthanc.start()
        try:
            orthanc.upload([f for day in studies.values() for _, files in day for f in files])
            pipe.env["PREREAD_CONFIG_FILE"] = str(sources_file(tmp_path, orthanc))
            pipe.full()
            first = sweep_cli(pipe, "run", "pacs", "--from", DAY1.isoformat(), "--to", DAY2.isoformat())
            assert first.returncode == 0, first.stderr[-3000:] + pipe.logs()
            after_first = reports_by_uid(pg_url)
            second = sweep_cli(pipe, "run", "pacs", "--from", DAY1.isoformat(), "--to", DAY2.isoformat())
            assert second.returncode == 0, second.stderr[-3000:]
            after_second = reports_by_uid(pg_url)
            forced = sweep_cli(pipe, "run", "pacs", "--from", DAY1.isoformat(), "--to", DAY2.isoformat(), "--force")
            assert forced.returncode == 0, forced.stderr[-3000:] + pipe.logs()
            listing = sweep_cli(pipe, "list")
        finally:
            orthanc.stop()
    assert after_first == {uid: (1, 1) for uid in wanted}, "exactly the studies of the two dates, drafted once"
    assert after_second == after_first, "a second run drafts nothing new"
    assert "skipped 4" in second.stderr, second.stderr[-2000:]
    assert reports_by_uid(pg_url) == {uid: (2, 1) for uid in wanted}, "--force drafts again and keeps the earlier report"
    states = query(pg_url, select(Sweep.id, Sweep.state).order_by(Sweep.id))
    assert [s for _, s in states] == ["done", "done", "done"]
    assert listing.returncode == 0 and "drafted 4" in listing.stdout


def test_coordinator_killed_mid_sweep_resumes_and_drafts_every_study_once(
    tmp_path: Path, pg_url: str, redis_server: RedisServer, tiny_model_dir: Path  # noqa: F811
) -> None:
    studies = [make_study(tmp_path / "in", DAY1, instances=2, hour=6 + i) for i in range(6)]
    with processes() as started:
        pipe = Pipeline(tmp_path, pg_url, redis_server.url, tiny_model_dir, started)
        orthanc = Orthanc(tmp_path, peers={"PREREAD": ("127.0.0.1", pipe.port)})
        orthanc.start()
        try:
            orthanc.upload([f for _, files in studies for f in files])
            pipe.env["PREREAD_CONFIG_FILE"] = str(sources_file(tmp_path, orthanc, max_in_flight=2, max_associations=1))
            pipe.full()
            created = sweep_cli(pipe, "run", "pacs", "--from", DAY1.isoformat(), "--to", DAY1.isoformat(), "--detach")
            assert created.returncode == 0, created.stderr
            sweep_id = int(created.stdout.strip())
            released = select(func.count()).select_from(SweepStudy).where(SweepStudy.state == "released")
            wait_until(lambda: query(pg_url, released)[0][0] >= 1, 300, what="a first study released")
            pipe.procs["coordinator"].kill(signal.SIGKILL)
            assert query(pg_url, released)[0][0] < 6, "killed in the middle of the sweep"
            pipe.coordinator()
            done = select(Sweep.state).where(Sweep.id == sweep_id)
            try:
                wait_until(lambda: query(pg_url, done)[0][0] == "done", 600, what="the sweep done after the restart")
            except AssertionError:
                raise AssertionError(pipe.logs()) from None
        finally:
            orthanc.stop()
    assert reports_by_uid(pg_url) == {uid: (1, 1) for uid, _ in studies}, "every study drafted once, none twice"
    hand_offs = query(pg_url, select(Outbox.study_id, func.count()).where(Outbox.topic == "render").group_by(Outbox.study_id))
    assert len(hand_offs) == 6 and all(n == 1 for _, n in hand_offs), "each study released to the pipeline once"
    instances = query(pg_url, select(Instance.sop_instance_uid, Instance.path))
    assert len(instances) == 12 and len({p for _, p in instances}) == 12, "no SOP instance stored twice"
    states = query(pg_url, select(Study.state))
    assert [s for (s,) in states] == [StudyState.DRAFTED] * 6


def test_a_live_study_is_drafted_before_the_sweeps_remaining_studies(
    tmp_path: Path, pg_url: str, redis_server: RedisServer, tiny_model_dir: Path  # noqa: F811
) -> None:
    from tests.support.procs import storescu

    swept = [make_study(tmp_path / "in", DAY1, hour=6 + i) for i in range(6)]
    live_uid, live_files = make_study(tmp_path / "live", DAY2)
    with processes() as started:
        pipe = Pipeline(tmp_path, pg_url, redis_server.url, tiny_model_dir, started)
        orthanc = Orthanc(tmp_path, peers={"PREREAD": ("127.0.0.1", pipe.port)})
        orthanc.start()
        try:
            orthanc.upload([f for _, files in swept for f in files])
            pipe.env["PREREAD_CONFIG_FILE"] = str(sources_file(tmp_path, orthanc, max_in_flight=1, max_associations=1))
            pipe.full()
            created = sweep_cli(pipe, "run", "pacs", "--from", DAY1.isoformat(), "--to", DAY1.isoformat(), "--detach")
            assert created.returncode == 0, created.stderr
            drafted = select(func.count()).select_from(Report)
            wait_until(lambda: query(pg_url, drafted)[0][0] >= 1, 300, what="a first sweep study drafted")
            drafted_before = query(pg_url, drafted)[0][0]
            sent = storescu(pipe.port, live_files)
            assert sent.returncode == 0, sent.stderr
            done = select(Sweep.state).where(Sweep.id == int(created.stdout.strip()))
            try:
                wait_until(lambda: query(pg_url, done)[0][0] == "done", 600, what="the sweep done")
                wait_until(lambda: reports_by_uid(pg_url).get(live_uid) == (1, 1), 300, what="the live study drafted")
            except AssertionError:
                raise AssertionError(pipe.logs()) from None
        finally:
            orthanc.stop()
    times = dict(query(pg_url, select(Study.study_instance_uid, Report.created_at).join(Report, Report.study_id == Study.id)))
    after_live = [uid for uid, _ in swept if times[uid] > times[live_uid]]
    # at most max_in_flight (1) sweep study waits in the pipeline, and one more may be retrieving, when the live one arrives
    assert len(after_live) >= 6 - drafted_before - 2 and after_live, (drafted_before, len(after_live))
