"""The Celery pipeline end to end, with real Redis, Postgres, dcmtk and separate processes.

Each test runs our own commands as child processes: ``preread listen``,
``preread coordinate`` (stability monitor, outbox dispatcher, reconciler) and
``preread worker`` for the render and infer queues, loading the tiny
random-weight model through the real model path.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import create_engine, func, select, text

from preread.schemas.findings import Urgency
from preread.schemas.tables import Finding, Report, Study, StudyState
from tests.conftest import testdata
from tests.support.studies import all_in, make_studies, states
from tests.support.procs import (
    PostgresServer,
    Proc,
    RedisServer,
    base_env,
    free_port,
    preread_argv,
    processes,
    storescu,
    wait_port,
    wait_until,
)

pytestmark = pytest.mark.slow




def _patient_identifiers(files: list[Path]) -> set[str]:
    """The patient names, IDs and birth dates in ``files``: none may reach a log."""
    values = set()
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
            value = str(ds.get(keyword) or "")
            if value:
                values.add(value)
                values.update(part for part in value.split("^") if len(part) > 3)
    return values






def reports_per_study(url: str) -> list[tuple[int, int, int]]:
    """(study id, reports, current reports) for every study."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(
                    Study.id,
                    func.count(Report.id),
                    func.count(Report.id).filter(Report.current.is_(True)),
                )
                .outerjoin(Report, Report.study_id == Study.id)
                .group_by(Study.id)
            ).all()
            return [tuple(r) for r in rows]
    finally:
        engine.dispose()


class Pipeline:
    """Listener, coordinator and workers as separate processes on one database and broker."""

    def __init__(self, tmp: Path, db_url: str, broker_url: str, model_dir: Path, started: list[Proc], **extra: object) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.started = started
        self.env = base_env(
            data_dir=tmp / "data",
            database_url=db_url,
            broker_url=broker_url,
            model=model_dir,
            port=self.port,
            host="127.0.0.1",
            stable_after=1,
            dispatch_interval=0.2,
            min_free_bytes=0,
            max_images=2,
            **extra,
        )
        self.procs: dict[str, Proc] = {}

    def start(self, name: str, *args: str) -> Proc:
        proc = Proc(preread_argv(*args), self.env, self.tmp / f"{name}.log").start()
        self.started.append(proc)
        self.procs[name] = proc
        return proc

    def listener(self) -> None:
        self.start("listener", "listen")
        wait_port(self.port, 90)

    def coordinator(self) -> None:
        self.start("coordinator", "coordinate")

    def render_worker(self) -> None:
        self.start("render", "worker", "--queues", "render", "--concurrency", "1")

    def infer_worker(self, name: str = "infer") -> Proc:
        return self.start(name, "worker", "--queues", "infer,export", "--concurrency", "2")

    def full(self) -> None:
        """Listener, coordinator, one render worker and one infer worker."""
        self.listener()
        self.coordinator()
        self.render_worker()
        self.infer_worker()

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{p.output()[-3000:]}" for name, p in self.procs.items())


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private real Redis, so a test may restart it without touching the machine's."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.kill()


def test_storescu_study_is_drafted_through_separate_workers(
    tmp_path: Path, pg_url: str, redis_server: RedisServer, tiny_model_dir: Path
) -> None:
    files = [testdata("CT_small.dcm"), testdata("MR_small.dcm")]
    with processes() as started:
        pipe = Pipeline(tmp_path, pg_url, redis_server.url, tiny_model_dir, started)
        pipe.full()
        sent = storescu(pipe.port, files)
        assert sent.returncode == 0, sent.stderr
        try:
            wait_until(lambda: all_in(pg_url, StudyState.DRAFTED, 2), 240, what="both studies DRAFTED")
        except AssertionError:
            raise AssertionError(pipe.logs()) from None
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        findings = conn.execute(select(func.count(Finding.id))).scalar_one()
        parsed = conn.execute(select(func.count()).select_from(Report).where(Report.parse_status == "ok")).scalar_one()
        probes = conn.execute(text("select count(*) from probe_scores where current")).scalar_one()
        urgencies = conn.execute(text(
            "select s.urgency, r.urgency, (select max(p.score) from probe_scores p where p.study_id = s.id and p.current) "
            "from studies s join reports r on r.study_id = s.id and r.current"
        )).all()
    engine.dispose()
    logs = "\n".join(p.output() for p in pipe.procs.values())
    assert "preread.render_study" in logs and "preread.infer_study" in logs, "the workers' logs were read"
    for phi in _patient_identifiers(files):
        assert phi not in logs, "no patient name or ID in any process's log"
    assert findings >= 2 and parsed == 2, "each constrained draft parsed with at least one finding"
    assert probes > 0
    assert len(urgencies) == 2
    for study_urgency, report_urgency, top_score in urgencies:
        # the default thresholds: priority from 0.5, stat from 0.85; the draft's own urgency may raise it
        from_probes = Urgency.STAT if top_score >= 0.85 else Urgency.PRIORITY if top_score >= 0.5 else Urgency.ROUTINE
        assert study_urgency == max(from_probes, Urgency(report_urgency), key=lambda u: u.rank)
    assert all(n == 1 and cur == 1 for _, n, cur in reports_per_study(pg_url))


def test_sigkill_of_infer_worker_mid_task_drafts_every_study_once(
    tmp_path: Path, pg_url: str, broker: str, tiny_model_dir: Path
) -> None:
    """On Redis the task comes back after the visibility timeout (or the reconciler); on RabbitMQ at once."""
    files = make_studies(tmp_path / "in", 6)
    with processes() as started:
        pipe = Pipeline(tmp_path, pg_url, broker, tiny_model_dir, started,
                        visibility_timeout=8, reconcile_after=15)
        pipe.listener()
        pipe.coordinator()
        pipe.render_worker()
        first = pipe.infer_worker("infer-1")
        assert storescu(pipe.port, files).returncode == 0

        wait_until(lambda: _infer_in_flight(pg_url), 180, interval=0.05, what="an infer task in flight")
        first.kill(signal.SIGKILL)
        assert not first.alive()
        pipe.infer_worker("infer-2")
        try:
            wait_until(lambda: all_in(pg_url, StudyState.DRAFTED, 6), 300, what="all studies DRAFTED after the kill")
        except AssertionError:
            raise AssertionError(pipe.logs()) from None
    assert all(n == 1 and cur == 1 for _, n, cur in reports_per_study(pg_url)), "one report per study, no duplicate"


def test_redis_restart_loses_no_queued_study(
    tmp_path: Path, pg_url: str, redis_server: RedisServer, tiny_model_dir: Path
) -> None:
    files = make_studies(tmp_path / "in", 4)
    with processes() as started:
        pipe = Pipeline(tmp_path, pg_url, redis_server.url, tiny_model_dir, started, reconcile_after=4)
        pipe.listener()
        pipe.coordinator()
        assert storescu(pipe.port, files).returncode == 0
        # No worker yet: the studies become STABLE and their render tasks sit in Redis.
        wait_until(lambda: all_in(pg_url, StudyState.STABLE, 4), 120, what="studies STABLE and queued")

        def outbox_sent() -> bool:
            engine = create_engine(pg_url)
            try:
                with engine.connect() as conn:
                    return conn.execute(text("select count(*) from outbox where sent_at is null")).scalar_one() == 0
            finally:
                engine.dispose()

        wait_until(outbox_sent, 60, what="outbox published")
        redis_server.restart()  # everything queued is gone: Redis keeps nothing on disk
        pipe.render_worker()
        pipe.infer_worker()
        try:
            wait_until(lambda: all_in(pg_url, StudyState.DRAFTED, 4), 300, what="all studies DRAFTED after Redis restart")
        except AssertionError:
            raise AssertionError(pipe.logs()) from None


def _infer_in_flight(url: str) -> bool:
    """True while an infer task has started on a study (its attempt is counted) and not finished."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return bool(conn.execute(
                select(func.count()).select_from(Study).where(Study.state == "RENDERED", Study.attempts > 0)
            ).scalar_one())
    finally:
        engine.dispose()


def test_postgres_restart_during_writes_tasks_retry_and_finish(
    tmp_path: Path, redis_server: RedisServer, tiny_model_dir: Path
) -> None:
    server = PostgresServer().init().start()
    try:
        url = server.url
        files = make_studies(tmp_path / "in", 6)
        with processes() as started:
            pipe = Pipeline(tmp_path, url, redis_server.url, tiny_model_dir, started, reconcile_after=30)
            pipe.full()
            assert storescu(pipe.port, files).returncode == 0
            wait_until(lambda: _infer_in_flight(url), 240, interval=0.05, what="an infer task in flight")
            server.halt()  # the task's result write meets a dead database
            time.sleep(5)
            server.start()
            try:
                wait_until(lambda: all_in(url, StudyState.DRAFTED, 6), 300, what="all studies DRAFTED after restart")
            except AssertionError:
                raise AssertionError(pipe.logs()) from None
            assert "transient" in pipe.procs["infer"].output(), "a task met the outage and was retried"
        assert all(n == 1 and cur == 1 for _, n, cur in reports_per_study(url))
    finally:
        server.stop()


def test_hundred_single_image_studies_all_complete(
    tmp_path: Path, pg_url: str, redis_server: RedisServer, tiny_model_dir: Path
) -> None:
    files = make_studies(tmp_path / "in", 100)
    with processes() as started:
        pipe = Pipeline(tmp_path, pg_url, redis_server.url, tiny_model_dir, started)
        pipe.full()
        assert storescu(pipe.port, files).returncode == 0
        try:
            wait_until(lambda: all_in(pg_url, StudyState.DRAFTED, 100), 600, interval=1, what="100 studies DRAFTED")
        except AssertionError:
            raise AssertionError(f"{states(pg_url)}\n{pipe.logs()}") from None
    assert all(n == 1 and cur == 1 for _, n, cur in reports_per_study(pg_url))


def test_preread_run_on_embedded_defaults(tmp_path: Path, tiny_model_dir: Path) -> None:
    port = free_port()
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    data = workdir / "preread-data"
    env = base_env(data_dir=data, model=tiny_model_dir, port=port, host="127.0.0.1", stable_after=1,
                   dispatch_interval=0.2, min_free_bytes=0, max_images=2)
    sqlite_url = f"sqlite:///{(data / 'preread.db').resolve()}"
    with processes() as started:
        run = Proc(preread_argv("run", "--no-live"), env, tmp_path / "run.log", cwd=workdir).start()
        started.append(run)
        wait_port(port, 120)
        assert storescu(port, [testdata("CT_small.dcm")]).returncode == 0
        try:
            wait_until(lambda: all_in(sqlite_url, StudyState.DRAFTED, 1), 300, what="the study DRAFTED on SQLite")
        except AssertionError:
            raise AssertionError(run.output()[-6000:]) from None
        shown = subprocess.run(preread_argv("status"), env=env, capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0, shown.stderr
        assert "DRAFTED" in shown.stdout and "render" in shown.stdout and "infer" in shown.stdout
        import psutil

        children = psutil.Process(run.pid).children(recursive=True)
        assert len(children) >= 3, "listener, render worker and infer worker run as children"
        run.proc.send_signal(signal.SIGTERM)  # only the parent: it must stop its children itself
        run.proc.wait(60)
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"preread run left {len(alive)} processes behind"
    assert (data / "queue").is_dir(), "the server-less queue lives in the data dir"
    assert [p.name for p in workdir.iterdir()] == ["preread-data"], "nothing is left outside the data dir"
    assert all(n == 1 and cur == 1 for _, n, cur in reports_per_study(sqlite_url))


def test_stat_study_overtakes_routine_ones_in_the_queue(
    tmp_path: Path, pg_url: str, redis_server: RedisServer, tiny_model_dir: Path
) -> None:
    routine = make_studies(tmp_path / "routine", 4)
    stat = make_studies(tmp_path / "stat", 1)[0]
    ds = pydicom.dcmread(stat)
    ds.RequestedProcedurePriority = "STAT"
    ds.save_as(stat)
    stat_uid = ds.StudyInstanceUID
    with processes() as started:
        pipe = Pipeline(tmp_path, pg_url, redis_server.url, tiny_model_dir, started)
        pipe.listener()
        pipe.coordinator()
        assert storescu(pipe.port, routine).returncode == 0
        wait_until(lambda: all_in(pg_url, StudyState.STABLE, 4), 120, what="routine studies queued")
        assert storescu(pipe.port, [stat]).returncode == 0
        wait_until(lambda: all_in(pg_url, StudyState.STABLE, 5), 120, what="the STAT study queued after them")
        pipe.render_worker()  # one task at a time
        wait_until(lambda: states(pg_url).get("RENDERED", 0) == 5, 180, what="all rendered")
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        first = conn.execute(
            select(Study.study_instance_uid).order_by(Study.state_changed_at).limit(1)
        ).scalar_one()
    engine.dispose()
    assert first == stat_uid, "the STAT study was rendered first although it arrived last"


def test_bad_input_fails_the_study_with_its_reason_and_no_retry(
    tmp_path: Path, pg_url: str, redis_server: RedisServer, tiny_model_dir: Path
) -> None:
    """A study with nothing to render (a structured report only) is FAILED at once; the others go on."""
    with processes() as started:
        pipe = Pipeline(tmp_path, pg_url, redis_server.url, tiny_model_dir, started, reconcile_after=3)
        pipe.full()
        assert storescu(pipe.port, [testdata("test-SR.dcm"), testdata("CT_small.dcm")]).returncode == 0
        try:
            wait_until(lambda: states(pg_url) == {"FAILED": 1, "DRAFTED": 1}, 240, what="one FAILED, one DRAFTED")
        except AssertionError:
            raise AssertionError(f"{states(pg_url)}\n{pipe.logs()}") from None
        time.sleep(8)  # longer than reconcile_after: a FAILED study must not be picked up again
        shown = subprocess.run(preread_argv("status"), env=pipe.env, capture_output=True, text=True, timeout=120)
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        failed = conn.execute(select(Study.modalities, Study.error, Study.attempts).where(Study.state == "FAILED")).one()
    engine.dispose()
    assert failed.modalities == "SR"
    assert "nothing renderable" in failed.error
    assert failed.attempts == 1, f"bad input is not retried\n{pipe.logs()}"
    assert states(pg_url) == {"FAILED": 1, "DRAFTED": 1}
    assert "nothing renderable" in shown.stdout, "preread status lists the failure and its reason"
