"""Signals to a worker: SIGHUP ends it cleanly (no re-exec, no orphan), and ``preread run`` carries on."""

from __future__ import annotations

import signal
from pathlib import Path

import psutil
import pytest

from tests.conftest import testdata
from tests.pipeline.test_queue import all_in
from preread.schemas.tables import StudyState
from tests.support.procs import Proc, base_env, free_port, preread_argv, processes, storescu, wait_port, wait_until

pytestmark = pytest.mark.slow


def _worker(run_pid: int, queue: str) -> psutil.Process | None:
    """The ``preread worker`` child of ``preread run`` serving ``queue``."""
    for child in psutil.Process(run_pid).children():
        try:
            argv = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "worker" in argv and any(a.startswith(queue) for a in argv):
            return child
    return None


def test_sighup_to_a_worker_leaves_no_orphan_and_the_pipeline_still_drafts(tmp_path: Path, tiny_model_dir: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    env = base_env(data_dir=data, model=tiny_model_dir, port=port, host="127.0.0.1", stable_after=1,
                   dispatch_interval=0.2, min_free_bytes=0, max_images=2)
    sqlite_url = f"sqlite:///{(data / 'preread.db').resolve()}"
    with processes() as started:
        run = Proc(preread_argv("run", "--no-live"), env, tmp_path / "run.log").start()
        started.append(run)
        wait_port(port, 120)
        render = wait_until(lambda: _worker(run.pid, "render"), 60, what="the render worker")
        wait_until(lambda: render.children(), 120, what="the render worker's pool process")
        family = [render, *render.children(recursive=True)]
        render.send_signal(signal.SIGHUP)  # what closing its terminal sends
        gone, alive = psutil.wait_procs(family, timeout=60)
        assert not alive, f"SIGHUP left {len(alive)} processes of the worker behind"
        log = run.output()
        assert "Restarting celery worker" not in log and "ModuleNotFoundError" not in log, log[-3000:]
        wait_until(lambda: (w := _worker(run.pid, "render")) is not None and w.pid != render.pid, 60,
                   what="preread run starting the render worker again")
        assert storescu(port, [testdata("CT_small.dcm")]).returncode == 0
        try:
            wait_until(lambda: all_in(sqlite_url, StudyState.DRAFTED, 1), 300, what="the study DRAFTED after the SIGHUP")
        except AssertionError:
            raise AssertionError(run.output()[-6000:]) from None
