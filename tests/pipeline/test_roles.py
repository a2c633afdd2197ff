"""The roles of a deployment, as separate processes: who publishes, who is ready, what status says.

``preread listen`` publishes the studies its stability monitor marks STABLE,
so a listener and workers draft without a coordinator; every process writes
a heartbeat; an infer worker whose model cannot load says why, takes no infer
task, and lets studies wait in RENDERED until a ready worker appears.
"""

from __future__ import annotations

import re

import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select

from preread.schemas.tables import Heartbeat, Study, StudyState
from tests.conftest import testdata
from tests.pipeline.test_queue import Pipeline, all_in, redis_server, states  # noqa: F401 (fixture)
from tests.support.procs import RedisServer, preread_argv, processes, storescu, wait_until

pytestmark = pytest.mark.slow


def heartbeats(url: str) -> list[Heartbeat]:
    """Every heartbeat row."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(Heartbeat)).all())
    finally:
        engine.dispose()


def study_row(url: str) -> Study:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(select(Study)).one()
    finally:
        engine.dispose()


def test_listen_and_worker_without_a_coordinator_draft_a_study(
    tmp_path: Path, pg_url: str, redis_server: RedisServer, tiny_model_dir: Path
) -> None:
    with processes() as started:
        pipe = Pipeline(tmp_path, pg_url, redis_server.url, tiny_model_dir, started)
        pipe.listener()
        pipe.render_worker()
        pipe.start("infer", "worker", "--queues", "infer", "--concurrency", "1")  # only the queue it holds back at first
        assert storescu(pipe.port, [testdata("CT_small.dcm")]).returncode == 0
        try:
            wait_until(lambda: all_in(pg_url, StudyState.DRAFTED, 1), 240, what="the study DRAFTED without a coordinator")
        except AssertionError:
            raise AssertionError(pipe.logs()) from None
        seen = {(row.role, row.state) for row in heartbeats(pg_url)}
        wait_until(lambda: any(float((row.details or {}).get("drafts_per_minute") or 0) > 0
                               for row in heartbeats(pg_url) if row.role == "worker"),
                   30, what="the infer worker's heartbeat counting its draft")
        shown = subprocess.run(preread_argv("status"), env=pipe.env, capture_output=True, text=True, timeout=120)
    assert ("listener", "ready") in seen and ("worker", "ready") in seen, seen
    assert shown.returncode == 0, shown.stderr
    assert "no coordinator seen in the last 60 s" in shown.stdout, shown.stdout
    assert "no worker for the" not in shown.stdout, "a worker of every queue was seen"
    assert re.search(r"^worker \S+ on cpu: model \S+, batch occupancy \d+%, 1\.0 drafts/min$", shown.stdout, re.MULTILINE), (
        "the infer worker (PREREAD_DEVICE=auto, no GPU here) is shown on the device it runs on, with its batches "
        f"and the one draft of the last minute:\n{shown.stdout}")


def test_infer_worker_without_its_model_is_not_ready_and_the_study_waits(
    tmp_path: Path, pg_url: str, redis_server: RedisServer, tiny_model_dir: Path
) -> None:
    missing = tmp_path / "no-such-model"
    with processes() as started:
        pipe = Pipeline(tmp_path, pg_url, redis_server.url, tiny_model_dir, started, reconcile_after=2, max_attempts=2,
                        readiness_recheck=600)
        pipe.listener()
        pipe.coordinator()
        pipe.render_worker()
        good_env = dict(pipe.env)
        pipe.env["PREREAD_MODEL"] = str(missing)
        pipe.infer_worker("infer-bad")
        pipe.env = good_env
        assert storescu(pipe.port, [testdata("CT_small.dcm")]).returncode == 0

        def not_ready() -> list[Heartbeat]:
            return [r for r in heartbeats(pg_url) if r.role == "worker" and r.state == "not_ready"]

        try:
            wait_until(lambda: all_in(pg_url, StudyState.RENDERED, 1) and not_ready(), 240, what="RENDERED, worker not ready")
        except AssertionError:
            raise AssertionError(pipe.logs()) from None
        reason = not_ready()[0].reason or ""
        assert str(missing) in reason and "PREREAD_MODEL=" in reason, reason
        log_lines = [line for line in pipe.procs["infer-bad"].output().splitlines() if "not ready for infer" in line]
        assert len(log_lines) == 1 and str(missing) in log_lines[0], "said once, in one line naming the model folder"
        time.sleep(8)  # several reconciler periods: waiting for a ready worker is not a failed attempt
        row = study_row(pg_url)
        assert row.state == StudyState.RENDERED and row.attempts == 0, (row.state, row.attempts, row.error)
        shown = subprocess.run(preread_argv("status"), env=pipe.env, capture_output=True, text=True, timeout=120)
        assert "RENDERED studies wait: no ready infer worker" in shown.stdout, shown.stdout
        assert str(missing) in shown.stdout.replace("\n", ""), "status shows the worker's reason"

        pipe.infer_worker("infer-good")
        try:
            wait_until(lambda: all_in(pg_url, StudyState.DRAFTED, 1), 240, what="DRAFTED once a ready worker started")
        except AssertionError:
            raise AssertionError(pipe.logs()) from None
    assert "preread.infer_study[" not in pipe.procs["infer-bad"].output(), "the not-ready worker took no infer task"
    assert "preread.infer_study[" in pipe.procs["infer-good"].output()


def test_not_ready_worker_rechecks_on_preread_retry_and_drafts_on_its_own(
    tmp_path: Path, pg_url: str, redis_server: RedisServer, tiny_model_dir: Path
) -> None:
    """The model folder appears later; `preread retry` makes the waiting worker look again at once."""
    import shutil

    folder = tmp_path / "model-arrives-later"
    with processes() as started:
        pipe = Pipeline(tmp_path, pg_url, redis_server.url, folder, started, readiness_recheck=3600)
        pipe.listener()
        pipe.start("worker", "worker", "--queues", "render,infer", "--concurrency", "1")
        assert storescu(pipe.port, [testdata("CT_small.dcm")]).returncode == 0
        try:
            wait_until(lambda: all_in(pg_url, StudyState.RENDERED, 1)
                       and any(r.state == "not_ready" for r in heartbeats(pg_url)), 240, what="RENDERED, not ready")
        except AssertionError:
            raise AssertionError(pipe.logs()) from None
        shutil.copytree(tiny_model_dir, folder)
        asked = subprocess.run(preread_argv("retry"), env=pipe.env, capture_output=True, text=True, timeout=120)
        assert asked.returncode == 0, asked.stderr
        try:
            wait_until(lambda: all_in(pg_url, StudyState.DRAFTED, 1), 240, what="DRAFTED after the recheck")
        except AssertionError:
            raise AssertionError(pipe.logs()) from None
    assert "recheck asked by preread retry" in pipe.procs["worker"].output()
