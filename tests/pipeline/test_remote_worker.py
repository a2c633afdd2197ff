"""A GPU host that shares only the queue and the database: the infer worker fetches PNGs from the API.

The listener host runs ``preread listen``, a render worker and ``preread api`` on
one data dir; the "GPU host" runs ``preread worker --queues infer`` with its own
empty data dir and only the broker URL, the database URL, PREREAD_IMAGES_URL,
PREREAD_WORKER_TOKEN and the model. Real Postgres, Redis, storescu and uvicorn.
"""

from __future__ import annotations

import subprocess
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

    def __init__(self, tmp: Path, db_url: str, broker_url: str, model_dir: Path, started: list[Proc]) -> None:
        self.api_port = free_port()
        super().__init__(tmp, db_url, broker_url, model_dir, started, api_port=self.api_port)

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

    def gpu_worker(self, name: str, token: str, data_dir: Path, model_dir: Path, db_url: str, broker_url: str) -> Proc:
        """An infer worker that knows only the broker, the database, the API and its model: nothing of this host."""
        env = base_env(data_dir=data_dir, database_url=db_url, broker_url=broker_url, images_url=self.images_url,
                       worker_token=token, model=model_dir)
        proc = Proc(preread_argv("worker", "--queues", "infer", "--concurrency", "1"), env, self.tmp / f"{name}.log").start()
        self.started.append(proc)
        self.procs[name] = proc
        return proc


def test_gpu_host_with_an_empty_data_dir_drafts_from_the_api_and_a_revoked_token_fails_clearly(
    tmp_path: Path, pg_url: str, redis_server: RedisServer, tiny_model_dir: Path
) -> None:
    ct_uid = _uid("CT_small.dcm")
    gpu_data = tmp_path / "gpu-host-data"
    gpu_data.mkdir()
    with processes() as started:
        host = ListenerHost(tmp_path, pg_url, redis_server.url, tiny_model_dir, started)
        host.listener()
        host.render_worker()
        host.api()
        token = host.cli("token", "create", "gpu-1", "--role", "worker").stdout.strip()
        host.gpu_worker("gpu-1", token, gpu_data, tiny_model_dir, pg_url, redis_server.url)
        assert storescu(host.port, [testdata("CT_small.dcm")]).returncode == 0
        try:
            wait_until(lambda: _in_state(pg_url, ct_uid, StudyState.DRAFTED), 240, what="the CT drafted on the GPU host")
        except AssertionError:
            raise AssertionError(host.logs()) from None
        gpu_log = host.procs["gpu-1"].output()
        images = _rows(pg_url, select(Image.path).join(Study).where(Study.study_instance_uid == ct_uid))
        fetched = _rows(pg_url, select(AuditEvent.token_name).where(
            AuditEvent.study_instance_uid == ct_uid, AuditEvent.action == "worker_fetch_image"))

        # The token is revoked while the worker runs: the next study fails at once, naming the setting.
        host.cli("token", "revoke", "gpu-1")
        mr_uid = _uid("MR_small.dcm")
        assert storescu(host.port, [testdata("MR_small.dcm")]).returncode == 0
        try:
            wait_until(lambda: _in_state(pg_url, mr_uid, StudyState.FAILED), 240, what="the MR FAILED with a refused token")
        except AssertionError:
            raise AssertionError(host.logs()) from None
        failed = _study(pg_url, mr_uid)
    assert "preread.infer_study[" in gpu_log and f"fetched {len(images)} images from {host.images_url}" in gpu_log
    assert images and all(Path(p).is_relative_to(tmp_path / "data") for (p,) in images), "rendered on the listener host"
    assert [name for (name,) in fetched] == ["gpu-1"] * len(images), "each PNG fetched once, audited under the worker"
    assert not any(gpu_data.rglob("*.png")), "the GPU host keeps no PNG once the draft is stored"
    assert not (gpu_data / "studies").exists(), "and never saw an instance"
    assert failed is not None and failed.attempts == 1, (failed.attempts if failed else None, "not retried")
    error = failed.error or ""
    for needle in (host.images_url, "PREREAD_IMAGES_URL", "refused PREREAD_WORKER_TOKEN", "HTTP 401", "--role worker"):
        assert needle in error, error
    assert token not in error and token not in host.procs["gpu-1"].output(), "the token is never printed"


def test_gpu_worker_with_a_refused_token_is_not_ready_and_status_says_why(
    tmp_path: Path, pg_url: str, redis_server: RedisServer, tiny_model_dir: Path
) -> None:
    with processes() as started:
        host = ListenerHost(tmp_path, pg_url, redis_server.url, tiny_model_dir, started)
        host.api()
        reader = host.cli("token", "create", "a-reader", "--role", "read").stdout.strip()
        host.gpu_worker("gpu-bad", reader, tmp_path / "gpu-data", tiny_model_dir, pg_url, redis_server.url)

        def not_ready() -> list[Heartbeat]:
            return [r for r in _rows(pg_url, select(Heartbeat)) if r.role == "worker" and r.state == "not_ready"]

        try:
            wait_until(not_ready, 180, what="the GPU worker's not-ready heartbeat")
        except AssertionError:
            raise AssertionError(host.logs()) from None
        reason = not_ready()[0].reason or ""
        shown = subprocess.run(preread_argv("status"), env=host.env, capture_output=True, text=True, timeout=120)
    for needle in (host.images_url, "PREREAD_IMAGES_URL", "refused PREREAD_WORKER_TOKEN", "HTTP 403", "read role"):
        assert needle in reason, reason
    assert shown.returncode == 0, shown.stderr
    assert "PREREAD_IMAGES_URL" in shown.stdout.replace("\n", ""), shown.stdout
    lines = [line for line in host.procs["gpu-bad"].output().splitlines() if "not ready for infer" in line]
    assert len(lines) == 1 and "PREREAD_WORKER_TOKEN" in lines[0], lines
