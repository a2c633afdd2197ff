"""A GPU host that shares only the queue and the database: the infer worker fetches PNGs from the API.

The listener host runs ``preread listen``, a render worker and ``preread api`` on
one data dir; the "GPU host" runs ``preread worker --queues infer`` with its own
empty data dir and only the broker URL, the database URL, PREREAD_IMAGES_URL,
PREREAD_WORKER_TOKEN and the model. Real Postgres, Redis, storescu and uvicorn.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from sqlalchemy import create_engine, select

from preread.schemas.tables import AuditEvent, Heartbeat, Image, Study, StudyState
from tests.conftest import testdata
from tests.pipeline.test_queue import Pipeline, redis_server  # noqa: F401 (fixture)
from tests.support.procs import Proc, RedisServer, base_env, free_port, preread_argv, processes, storescu, wait_until

pytestmark = pytest.mark.slow


def _rows(url: str, query: Any) -> list[Any]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(query).all())
    finally:
        engine.dispose()


def _study(url: str, uid: str) -> Any:
    """The study's row (state, attempts, error), or None."""
    rows = _rows(url, select(Study).where(Study.study_instance_uid == uid))
    return rows[0] if rows else None


def _in_state(url: str, uid: str, state: StudyState) -> bool:
    study = _study(url, uid)
    return study is not None and study.state == state


def _uid(name: str) -> str:
    return str(pydicom.dcmread(testdata(name), stop_before_pixels=True).StudyInstanceUID)


class ListenerHost(Pipeline):
    """Listener, render worker and the API on one data dir; a token maker for the GPU hosts."""

    def __init__(self, tmp: Path, db_url: str, broker_url: str, model_dir: Path, started: list[Proc],
                 **extra: object) -> None:
        self.api_port = free_port()
        super().__init__(tmp, db_url, broker_url, model_dir, started, api_port=self.api_port, **extra)

    @property
    def images_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def api(self) -> None:
        self.start("api", "api")
        wait_until(lambda: httpx.get(f"{self.images_url}/healthz", timeout=2).status_code == 200, 120, what="the API")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(preread_argv(*args), env=self.env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done

    def gpu_worker(self, name: str, token: str, data_dir: Path, model_dir: Path, db_url: str, broker_url: str,
                   **extra: object) -> Proc:
        """An infer worker that knows only the broker, the database, the API and its model: nothing of this host."""
        env = base_env(data_dir=data_dir, database_url=db_url, broker_url=broker_url, images_url=self.images_url,
                       worker_token=token, model=model_dir, **extra)
        proc = Proc(preread_argv("worker", "--queues", "infer", "--concurrency", "1"), env, self.tmp / f"{name}.log").start()
        self.started.append(proc)
        self.procs[name] = proc
        return proc


def _not_ready_workers(url: str) -> list[Heartbeat]:
    return [r for r in _rows(url, select(Heartbeat)) if r.role == "worker" and r.state == "not_ready"]


def test_gpu_host_drafts_from_the_api_and_a_revoked_token_pauses_the_worker_not_the_study(
    tmp_path: Path, pg_url: str, redis_server: RedisServer, tiny_model_dir: Path
) -> None:
    ct_uid, mr_uid = _uid("CT_small.dcm"), _uid("MR_small.dcm")
    gpu_data = tmp_path / "gpu-host-data"
    gpu_data.mkdir()
    with processes() as started:
        host = ListenerHost(tmp_path, pg_url, redis_server.url, tiny_model_dir, started, reconcile_after=2)
        host.listener()
        host.render_worker()
        host.api()
        token = host.cli("token", "create", "gpu-1", "--role", "worker").stdout.strip()
        host.gpu_worker("gpu-1", token, gpu_data, tiny_model_dir, pg_url, redis_server.url, readiness_recheck=1)
        assert storescu(host.port, [testdata("CT_small.dcm")]).returncode == 0
        try:
            wait_until(lambda: _in_state(pg_url, ct_uid, StudyState.DRAFTED), 240, what="the CT drafted on the GPU host")
        except AssertionError:
            raise AssertionError(host.logs()) from None
        gpu_log = host.procs["gpu-1"].output()
        images = _rows(pg_url, select(Image.path).join(Study).where(Study.study_instance_uid == ct_uid))
        fetched = _rows(pg_url, select(AuditEvent.token_name).where(
            AuditEvent.study_instance_uid == ct_uid, AuditEvent.action == "worker_fetch_image"))

        # The token is revoked while the worker runs: the next study waits, the worker says why and stops taking infer.
        host.coordinator()  # its reconciler (every 2 s here) re-enqueues RENDERED studies only for a ready worker
        host.cli("token", "revoke", "gpu-1")
        assert storescu(host.port, [testdata("MR_small.dcm")]).returncode == 0
        try:
            wait_until(lambda: _in_state(pg_url, mr_uid, StudyState.RENDERED) and _not_ready_workers(pg_url)
                       and "preread.infer_study[" in host.procs["gpu-1"].output()[len(gpu_log):],
                       240, what="the MR taken by the GPU worker, which turned not ready")
        except AssertionError:
            raise AssertionError(host.logs()) from None
        time.sleep(6)  # several reconciler passes and readiness rechecks: none fails the study or repeats the log
        waiting = _study(pg_url, mr_uid)
        reason = _not_ready_workers(pg_url)[0].reason or ""
        shown = subprocess.run(preread_argv("status"), env=host.env, capture_output=True, text=True, timeout=120)
        paused_log = host.procs["gpu-1"].output()

        # The operator's fix: a new worker token, set on the GPU host, and the worker restarted with it.
        new_token = host.cli("token", "create", "gpu-1b", "--role", "worker").stdout.strip()
        host.procs["gpu-1"].stop()
        host.gpu_worker("gpu-1b", new_token, gpu_data, tiny_model_dir, pg_url, redis_server.url, readiness_recheck=1)
        try:
            wait_until(lambda: _in_state(pg_url, mr_uid, StudyState.DRAFTED), 240, what="the MR drafted after the fix")
        except AssertionError:
            raise AssertionError(host.logs()) from None
        mr_fetched = _rows(pg_url, select(AuditEvent.token_name).where(
            AuditEvent.study_instance_uid == mr_uid, AuditEvent.action == "worker_fetch_image"))
        logs = host.procs["gpu-1"].output() + host.procs["gpu-1b"].output()
    assert "preread.infer_study[" in gpu_log and f"fetched {len(images)} images from {host.images_url}" in gpu_log
    assert images and all(Path(p).is_relative_to(tmp_path / "data") for (p,) in images), "rendered on the listener host"
    assert [name for (name,) in fetched] == ["gpu-1"] * len(images), "each PNG fetched once, audited under the worker"
    assert not any(gpu_data.rglob("*.png")), "the GPU host keeps no PNG once the draft is stored"
    assert not (gpu_data / "studies").exists(), "and never saw an instance"

    assert waiting is not None and waiting.state == StudyState.RENDERED, (waiting.state if waiting else None)
    assert waiting.attempts == 0 and waiting.error is None, (waiting.attempts, waiting.error, "no attempt, no failure")
    for needle in (host.images_url, "PREREAD_IMAGES_URL", "refused PREREAD_WORKER_TOKEN", "HTTP 401", "--role worker",
                   "restart this worker"):
        assert needle in reason, reason
    assert shown.returncode == 0, shown.stderr
    flat = shown.stdout.replace("\n", "")
    assert "RENDERED studies wait: no ready infer worker" in shown.stdout and "PREREAD_WORKER_TOKEN" in flat, shown.stdout
    said = [line for line in paused_log.splitlines() if "refused PREREAD_WORKER_TOKEN" in line]
    assert len(said) == 1 and "not ready for infer" in said[0], said
    taken = [line for line in paused_log[len(gpu_log):].splitlines() if "preread.infer_study[" in line and "received" in line]
    assert len(taken) == 1, ("paused after the MR: no infer task taken again while not ready", taken)

    assert [name for (name,) in mr_fetched] == ["gpu-1b"] * len(mr_fetched) and mr_fetched, mr_fetched
    assert token not in logs and new_token not in logs, "no token is ever printed"


def test_gpu_worker_with_a_refused_token_is_not_ready_and_status_says_why(
    tmp_path: Path, pg_url: str, redis_server: RedisServer, tiny_model_dir: Path
) -> None:
    with processes() as started:
        host = ListenerHost(tmp_path, pg_url, redis_server.url, tiny_model_dir, started)
        host.api()
        reader = host.cli("token", "create", "a-reader", "--role", "read").stdout.strip()
        host.gpu_worker("gpu-bad", reader, tmp_path / "gpu-data", tiny_model_dir, pg_url, redis_server.url)
        try:
            wait_until(lambda: _not_ready_workers(pg_url), 180, what="the GPU worker's not-ready heartbeat")
        except AssertionError:
            raise AssertionError(host.logs()) from None
        reason = _not_ready_workers(pg_url)[0].reason or ""
        shown = subprocess.run(preread_argv("status"), env=host.env, capture_output=True, text=True, timeout=120)
    for needle in (host.images_url, "PREREAD_IMAGES_URL", "refused PREREAD_WORKER_TOKEN", "HTTP 403", "read role"):
        assert needle in reason, reason
    assert shown.returncode == 0, shown.stderr
    assert "PREREAD_IMAGES_URL" in shown.stdout.replace("\n", ""), shown.stdout
    lines = [line for line in host.procs["gpu-bad"].output().splitlines() if "not ready for infer" in line]
    assert len(lines) == 1 and "PREREAD_WORKER_TOKEN" in lines[0], lines
