"""Recovery after a worker crash: SIGKILL of the infer worker mid-task to every study DRAFTED, Redis vs RabbitMQ.

For each broker: a fresh Postgres database, ``preread listen``, ``preread
coordinate``, a render worker and an infer worker as separate processes on
the tiny model; N one-image studies sent with storescu; the infer worker is
SIGKILLed while a task runs and a second one started at once; the clock runs
from the kill to the last study DRAFTED. On Redis the killed worker's task
comes back after the visibility timeout or when the reconciler re-enqueues it,
whichever is first; on RabbitMQ it returns to its queue when the worker's
connection drops. The baseline is RabbitMQ, measured in the same run.

    python bench/recovery.py [--studies 6] [--reconcile-after 300] [--visibility-timeout 1800]

Goals (issue 12): RabbitMQ ≤ 30 s; Redis no longer than the reconciler period (reconcile_after plus one pass).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pydicom  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy import create_engine, func, select, text  # noqa: E402


def make_studies(folder: Path, count: int) -> list[Path]:
    """``count`` one-image studies cloned from pydicom's CT, each with its own UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    original = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    files = []
    for i in range(count):
        ds = original.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"study{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def counts(url: str) -> tuple[int, int, int]:
    """(studies, DRAFTED, RENDERED with an attempt counted: an infer task in flight)."""
    from preread.schemas.tables import Study

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(Study)).scalar_one()
            drafted = conn.execute(select(func.count()).select_from(Study).where(Study.state == "DRAFTED")).scalar_one()
            busy = conn.execute(select(func.count()).select_from(Study).where(Study.state == "RENDERED", Study.attempts > 0)).scalar_one()
            return total, drafted, busy
    finally:
        engine.dispose()


def rabbit_vhost(name: str, create: bool) -> None:
    exe = shutil.which("rabbitmqctl")
    assert exe, "rabbitmqctl not found"
    if create:
        subprocess.run([exe, "add_vhost", name], check=True, capture_output=True)
        subprocess.run([exe, "set_permissions", "-p", name, "guest", ".*", ".*", ".*"], check=True, capture_output=True)
    else:
        subprocess.run([exe, "delete_vhost", name], capture_output=True)


def ready_workers(url: str) -> int:
    """Infer workers whose heartbeat says ready."""
    from preread.schemas.tables import Heartbeat

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(Heartbeat).where(
                Heartbeat.state == "ready", Heartbeat.queues.like("%infer%"))).scalar_one())
    finally:
        engine.dispose()


def one_run(kind: str, tmp: Path, admin_url: str, model_dir: Path, files: list[Path],
            settings: dict[str, object]) -> tuple[float, float]:
    """Seconds from the SIGKILL to the new infer worker ready, and to every study DRAFTED, on broker ``kind``."""
    from preread.schemas.database import upgrade
    from tests.support.procs import Proc, RedisServer, base_env, free_port, preread_argv, storescu, wait_port, wait_until

    work = tmp / kind
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    dbname = f"preread_recovery_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{dbname}"'))
    url = admin_url.rsplit("/", 1)[0] + f"/{dbname}"
    upgrade(url)
    redis, vhost = None, None
    if kind == "redis":
        redis = RedisServer(work / "redis").start()
        broker = redis.url
    else:
        vhost = f"preread-bench-{uuid.uuid4().hex[:8]}"
        rabbit_vhost(vhost, True)
        broker = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    port = free_port()
    env = base_env(data_dir=work / "data", database_url=url, broker_url=broker, model=model_dir, port=port,
                   host="127.0.0.1", stable_after=1, dispatch_interval=0.2, min_free_bytes=0, max_images=2, **settings)
    work.mkdir(parents=True, exist_ok=True)
    procs: list[Proc] = []

    def start(name: str, *args: str) -> Proc:
        proc = Proc(preread_argv(*args), env, work / f"{name}.log").start()
        procs.append(proc)
        return proc

    try:
        start("listener", "listen")
        start("coordinator", "coordinate")
        start("render", "worker", "--queues", "render", "--concurrency", "1")
        first = start("infer-1", "worker", "--queues", "infer,export", "--concurrency", "2")
        wait_port(port, 120)
        assert storescu(port, files).returncode == 0
        wait_until(lambda: counts(url)[2] > 0, 600, interval=0.05, what="an infer task in flight")
        ready_before = ready_workers(url)
        first.kill(signal.SIGKILL)
        killed_at = time.perf_counter()
        start("infer-2", "worker", "--queues", "infer,export", "--concurrency", "2")
        wait_until(lambda: ready_workers(url) > ready_before, 600, interval=0.2, what="the new infer worker ready")
        ready_at = time.perf_counter()
        wait_until(lambda: counts(url)[1] == len(files), 3600, interval=0.5, what="all studies DRAFTED")
        return ready_at - killed_at, time.perf_counter() - killed_at
    finally:
        for p in procs:
            p.kill()
        if redis is not None:
            redis.kill()
        if vhost is not None:
            rabbit_vhost(vhost, False)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--reconcile-after", type=float, default=300.0, help="PREREAD_RECONCILE_AFTER (default as shipped)")
    parser.add_argument("--visibility-timeout", type=int, default=None, help="PREREAD_VISIBILITY_TIMEOUT (default: derived)")
    parser.add_argument("--brokers", default="rabbitmq,redis", help="comma-separated; the first is the baseline")
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres", help="admin URL")
    args = parser.parse_args()

    from preread.schemas.settings import Settings
    from tests.support.tiny_model import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="preread-recovery-"))
    model_dir = build_tiny_model(tmp / "tiny-model")
    files = make_studies(tmp / "in", args.studies)
    settings: dict[str, object] = {"reconcile_after": args.reconcile_after}
    if args.visibility_timeout:
        settings["visibility_timeout"] = args.visibility_timeout
    visibility = Settings(**settings).effective_visibility_timeout  # type: ignore[arg-type]
    kinds = [k.strip() for k in args.brokers.split(",") if k.strip()]
    results = {kind: one_run(kind, tmp, args.pg, model_dir, files, settings) for kind in kinds}

    table = Table(title=f"bench/recovery.py: SIGKILL of the infer worker mid-task → all {args.studies} studies DRAFTED "
                        f"(reconcile_after {args.reconcile_after:.0f} s, Redis visibility timeout {visibility} s)")
    table.add_column("broker")
    table.add_column("kill → new worker ready (s)", justify="right")
    table.add_column("kill → all DRAFTED (s)", justify="right")
    table.add_column(f"ratio to {kinds[0]}", justify="right")
    table.add_column("goal")
    base = results[kinds[0]][1]
    for kind, (ready, seconds) in results.items():
        if kind == "rabbitmq":
            text_goal, met = "≤ 30 s", seconds <= 30
        else:
            limit = args.reconcile_after * 1.1
            text_goal, met = f"≤ reconcile_after + 10 % ({limit:.0f} s)", seconds <= limit
        table.add_row(kind, f"{ready:.1f}", f"{seconds:.1f}", f"{seconds / base:.1f}×", f"{text_goal}: {'met' if met else 'NOT met'}")
    Console().print(table)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
