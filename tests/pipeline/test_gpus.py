"""``preread worker --gpus``: one pinned worker per GPU, restarted when it dies; the CPU stands in for GPUs."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from preread.worker.pipeline.gpus import (
    DraftMeter,
    GpuSupervisor,
    NoGpus,
    cuda_device_count,
    parse_gpus,
    worker_details,
    worker_lines,
)
from tests.pipeline.test_queue import redis_server  # noqa: F401  (the fixture)
from tests.support.procs import RedisServer, base_env, preread_argv, wait_until

MODEL_LOADED = "preread.worker.inference.model: loaded model "  # model.py logs one line per load


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def test_gpus_on_a_machine_without_gpus_is_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    if cuda_device_count():
        pytest.skip("this machine has a GPU")
    env = base_env(data_dir=tmp_path / "data")
    for spec in ("all", "0,1"):
        done = subprocess.run(preread_argv("worker", "--gpus", spec), env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and f"--gpus {spec}: no CUDA GPU is visible" in lines[0], done.stderr
        assert "Traceback" not in done.stderr


def test_gpu_list_is_all_or_distinct_known_indices() -> None:
    assert parse_gpus("all", ["0", "1", "2"]) == ["0", "1", "2"]
    assert parse_gpus("2, 0", ["0", "1", "2"]) == ["2", "0"]
    for bad in ("3", "0,0", "one", ""):
        with pytest.raises(NoGpus, match=r"--gpus .*: give 'all' or distinct indices from 0, 1, 2"):
            parse_gpus(bad, ["0", "1", "2"])


def test_one_pinned_worker_per_device_each_loading_the_model_once_and_a_dead_one_restarted(
    tmp_path: Path, pg_url: str, redis_server: RedisServer, tiny_model_dir: Path  # noqa: F811
) -> None:
    env = base_env(data_dir=tmp_path / "data", database_url=pg_url, broker_url=redis_server.url,
                   model=tiny_model_dir, device="cpu")
    supervisor = GpuSupervisor(["0", "1"], preread_argv("worker", "--queues", "infer", "--concurrency", "1"),
                               env=env, log_dir=tmp_path / "logs", poll_s=0.2)
    logs = {d: tmp_path / "logs" / f"worker-gpu{d}.log" for d in ("0", "1")}

    def loaded(device: str) -> int:
        return logs[device].read_text(errors="replace").count(MODEL_LOADED) if logs[device].exists() else 0

    supervisor.start()
    try:
        import threading

        runner = threading.Thread(target=supervisor.run, daemon=True)
        runner.start()
        first = {c.device: c.pid for c in supervisor.children}
        assert len(first) == 2 and None not in first.values()
        for child in supervisor.children:
            assert child.pid is not None
            assert _environ(child.pid)["CUDA_VISIBLE_DEVICES"] == child.device
        wait_until(lambda: loaded("0") == 1 and loaded("1") == 1, 300, what="each worker loading the model")

        pid0 = first["0"]
        assert pid0 is not None
        os.kill(pid0, signal.SIGKILL)
        wait_until(lambda: supervisor.children[0].pid not in (None, pid0), 60, what="GPU 0's worker restarted")
        new_pid = supervisor.children[0].pid
        assert new_pid is not None and _environ(new_pid)["CUDA_VISIBLE_DEVICES"] == "0"
        wait_until(lambda: loaded("0") == 2, 300, what="the restarted worker loading the model")
        assert supervisor.children[1].pid == first["1"] and supervisor.children[1].proc.poll() is None  # type: ignore[union-attr]
        assert loaded("1") == 1  # the other worker kept its model: loaded once
        assert [c.restarts for c in supervisor.children] == [1, 0]
    finally:
        supervisor.stop(timeout=60)
    assert all(c.proc is not None and c.proc.poll() is not None for c in supervisor.children)


def test_worker_details_and_status_lines() -> None:
    now = [1000.0]
    meter = DraftMeter(window_s=60.0, clock=lambda: now[0])
    for t in (950.0, 990.0, 995.0):
        now[0] = t
        meter.record()
    now[0] = 1015.0  # the first draft is now older than a minute

    class Batcher:
        batch_sizes = [8, 4, 4]

    class Engine:
        batch_size = 8
        _batcher = Batcher()

    os.environ["CUDA_VISIBLE_DEVICES"] = "3"
    try:
        details = worker_details("InfiX-ai/InfiMed-SFT-3B", "cuda:0", Engine(), meter)
    finally:
        del os.environ["CUDA_VISIBLE_DEVICES"]
    assert details == {"device": "cuda:0 (GPU 3)", "gpu": "3", "model": "InfiX-ai/InfiMed-SFT-3B",
                       "batch_occupancy": 0.667, "drafts_per_minute": 2.0}
    lines = worker_lines([("gpu-host", 41, details), ("gpu-host", 42, None), ("cpu-host", 7, {"queues": "render"})])
    assert lines == ["worker gpu-host:41 on cuda:0 (GPU 3): model InfiX-ai/InfiMed-SFT-3B, batch occupancy 67%, "
                     "2.0 drafts/min"]
