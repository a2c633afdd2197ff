"""Pipeline throughput and overhead: listen → render → infer (tiny model) → database.

Sends N one-image CT studies with dcmtk's storescu to ``preread listen`` and
runs ``preread coordinate`` and render/infer workers as separate processes on
real Redis and Postgres, until every study is DRAFTED. Prints studies/min and
the CPU time per study spent outside the model call: the CPU time of all
pipeline processes (listener, coordinator, render and infer workers, their
children) minus the CPU time of the infer worker's model thread (the OS thread
named ``preread-model`` that runs every batch). As a baseline, the same model
calls (probes and draft on the same PNGs) run again in this process.

    python bench/pipeline.py [--studies 100] [--pg postgresql+psycopg://postgres@127.0.0.1/postgres]

Goal (issue 6): ≤ 150 ms CPU per study outside the model call.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402


def _cpu_seconds(pids: list[int]) -> float:
    """User+system CPU of processes and all their descendants, alive now."""
    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            procs = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    return total


def _model_thread_cpu(pid: int, name: str = "preread-model") -> float:
    """CPU seconds of the threads of ``pid`` named ``name`` (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().strip() != name:
                continue
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=100)
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres", help="admin URL")
    args = parser.parse_args()

    from preread.schemas.database import upgrade
    from preread.schemas.settings import Settings
    from tests.support.procs import Proc, RedisServer, base_env, free_port, preread_argv, storescu, wait_port, wait_until
    from tests.support.studies import all_in, make_studies
    from tests.support.tiny_model import build_tiny_model

    console = Console()
    tmp = Path(tempfile.mkdtemp(prefix="preread-bench-"))
    model_dir = build_tiny_model(tmp / "tiny-model")
    files = make_studies(tmp / "in", args.studies)

    admin = create_engine(args.pg, isolation_level="AUTOCOMMIT")
    dbname = f"preread_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{dbname}"'))
    url = args.pg.rsplit("/", 1)[0] + f"/{dbname}"
    upgrade(url)
    redis = RedisServer(tmp / "redis").start()
    port = free_port()
    env = base_env(data_dir=tmp / "data", database_url=url, broker_url=redis.url, model=model_dir, port=port,
                   host="127.0.0.1", stable_after=1, dispatch_interval=0.2, min_free_bytes=0, max_images=1)
    procs: list[Proc] = []
    try:
        for name, argv in [
            ("listener", preread_argv("listen")),
            ("coordinator", preread_argv("coordinate")),
            ("render", preread_argv("worker", "--queues", "render", "--concurrency", "1")),
            ("infer", preread_argv("worker", "--queues", "infer,export", "--concurrency", "2")),
        ]:
            procs.append(Proc(argv, env, tmp / f"{name}.log").start())
        wait_port(port, 120)
        time.sleep(10)  # let the workers load their models before the clock starts
        infer_pid = procs[-1].pid
        cpu_before = _cpu_seconds([p.pid for p in procs])
        model_before = _model_thread_cpu(infer_pid)
        started = time.perf_counter()
        sent = storescu(port, files)
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: all_in(url, "DRAFTED", args.studies), 3600, interval=0.5, what="all studies DRAFTED")
        wall = time.perf_counter() - started
        cpu_pipeline = _cpu_seconds([p.pid for p in procs]) - cpu_before
        cpu_model_thread = _model_thread_cpu(infer_pid) - model_before
        assert cpu_model_thread > 0, "the infer worker's model thread was not found"
    finally:
        for p in procs:
            p.kill()
        redis.kill()

    # Baseline: the model calls alone, on the same rendered images, in this process.
    from preread.worker.inference.engine import Engine, StudyContext

    settings = Settings(model=str(model_dir), max_images=1, data_dir=tmp / "data", database_url=url)
    engine = Engine.from_settings(settings)
    db = create_engine(url)
    with db.connect() as conn:
        images = [Path(p) for p in conn.execute(text("select path from images order by study_id, ordinal")).scalars()]
    db.dispose()
    ctx = StudyContext(modality="CT", body_part=None, study_description=None, patient_age=None, patient_sex=None)
    engine.probe(images[:1], ctx)  # warm-up (grammar compilation), as the workers were warm
    engine.draft(images[:1], ctx)
    cpu0 = time.process_time()
    for image in images:
        engine.probe([image], ctx)
        engine.draft([image], ctx)
    cpu_model = time.process_time() - cpu0
    engine.close()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))

    n = args.studies
    outside_ms = (cpu_pipeline - cpu_model_thread) * 1000 / n
    table = Table(title=f"bench/pipeline.py: {n} one-image CT studies, storescu → listen → render → infer (tiny model) → Postgres")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("wall time, first byte to last DRAFTED (s)", f"{wall:.1f}")
    table.add_row("studies / min", f"{n * 60 / wall:.1f}")
    table.add_row("pipeline CPU, all processes (ms / study)", f"{cpu_pipeline * 1000 / n:.0f}")
    table.add_row("model thread of the infer worker (ms / study)", f"{cpu_model_thread * 1000 / n:.0f}")
    table.add_row("baseline: same model calls alone, one thread (ms / study)", f"{cpu_model * 1000 / n:.0f}")
    table.add_row("CPU outside the model call (ms / study)", f"{outside_ms:.0f}")
    table.add_row("goal ≤ 150 ms / study", "met" if outside_ms <= 150 else "NOT met")
    console.print(table)


if __name__ == "__main__":
    main()
