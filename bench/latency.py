"""Latency from the end of an association to the draft committed (issue 16, item 1).

Sends N single-image CR studies one at a time with dcmtk's storescu (one association
each, waiting for each draft before the next) to (a) ``preread run`` on the embedded
default (SQLite, server-less file queue) and (b) separate ``preread listen``,
``coordinate`` and render/infer ``worker`` processes on Postgres and a private Redis,
tiny model. ``PREREAD_STABLE_AFTER`` is 600 s: every study is made STABLE by its
released association after CR's ``release_grace`` (1 s).

Per study: latency = the draft row's ``created_at`` minus the moment storescu returned
(the association released). Pipeline time = latency minus the configured grace minus
the model's own time for that study, measured in this process on the same PNGs (probes
and draft, the baseline of the same run). Prints p50/p95 of both per backend.

    python bench/latency.py [--studies 50] [--pg postgresql+psycopg://postgres@127.0.0.1:5432/postgres]

Goal: pipeline time p95 <= 1.5 s on both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

#: CR's release grace (the default table), the configured wait this bench subtracts.
GRACE_S = 1.0


def _cr_studies(folder: Path, count: int) -> list[tuple[str, Path]]:
    from pydicom.uid import generate_uid

    from tests.support.synthetic import projection, save

    out = []
    for i in range(count):
        uid = generate_uid()
        ds = projection(study_uid=uid, series_uid=generate_uid(), series_number=1, instance_number=1, view="PA")
        out.append((uid, save(ds, folder / f"{i:03d}")))
    return out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[k]


def _ts(value: object) -> datetime:
    """A database timestamp as an aware UTC datetime (SQLite gives text, both store naive UTC)."""
    at = datetime.fromisoformat(value) if isinstance(value, str) else value
    assert isinstance(at, datetime), value
    return at if at.tzinfo else at.replace(tzinfo=timezone.utc)


def _send_and_time(port: int, url: str, studies: list[tuple[str, Path]]) -> tuple[list[float], list[str]]:
    """Latency per study (s), sent one at a time; and the UIDs in order."""
    from tests.support.procs import storescu, wait_until

    engine = create_engine(url)
    latencies = []
    try:
        for uid, path in studies:
            sent = storescu(port, [path])
            released = datetime.now(timezone.utc)
            assert sent.returncode == 0, sent.stderr

            def drafted() -> datetime | None:
                with engine.connect() as conn:
                    row = conn.execute(text(
                        "select r.created_at from reports r join studies s on s.id = r.study_id "
                        "where s.study_instance_uid = :u and r.current"), dict(u=uid)).first()
                return row[0] if row else None

            at = _ts(wait_until(drafted, 300, interval=0.02, what=f"study {uid} drafted"))
            latencies.append((at - released).total_seconds())
    finally:
        engine.dispose()
    return latencies, [uid for uid, _ in studies]


#: The path's steps, each between two moments the database records (seconds, per study).
STAGES = [
    ("grace end -> STABLE", "stability monitor's tick after the release grace"),
    ("STABLE -> render queued", "outbox row published by the listener"),
    ("render queued -> rendered", "queue wait + render + commit"),
    ("rendered -> infer queued", "hand-off published by the render task"),
    ("infer queued -> committed - model", "queue wait + draft commit"),
]


def _stages(url: str, uids: list[str], model: list[float]) -> dict[str, list[float]]:
    """Per study, the seconds each of :data:`STAGES` took, from the rows the pipeline wrote."""
    db = create_engine(url)
    out: dict[str, list[float]] = {name: [] for name, _ in STAGES}
    with db.connect() as conn:
        for uid, model_s in zip(uids, model, strict=True):
            study_id, hint = conn.execute(text("select id, release_hint_at from studies where study_instance_uid = :u"),
                                          dict(u=uid)).one()
            outbox = {topic: (_ts(c), _ts(s)) for topic, c, s in conn.execute(text(
                "select topic, created_at, sent_at from outbox where study_id = :i and sent_at is not null order by id desc"),
                dict(i=study_id))}  # the first row of each topic wins
            report = _ts(conn.execute(text("select created_at from reports where study_id = :i and current"),
                                      dict(i=study_id)).scalar_one())
            (stable, render_sent), (rendered, infer_sent) = outbox["render"], outbox["infer"]
            for name, seconds in zip(out, [
                (stable - _ts(hint)).total_seconds(),
                (render_sent - stable).total_seconds(),
                (rendered - render_sent).total_seconds(),
                (infer_sent - rendered).total_seconds(),
                (report - infer_sent).total_seconds() - model_s,
            ], strict=True):
                out[name].append(seconds)
    db.dispose()
    return out


def _model_seconds(model_dir: Path, url: str, uids: list[str], data_dir: Path) -> list[float]:
    """The model's own time per study: the worker's draft timings (prepare, preprocess, generate, from the
    report row) plus the probes' time on the same PNGs measured in this process (probes keep no timings)."""
    from preread.schemas.settings import Settings
    from preread.worker.inference.engine import Engine, StudyContext

    settings = Settings(model=str(model_dir), max_images=1, data_dir=data_dir, database_url=url)
    engine = Engine.from_settings(settings)
    db = create_engine(url)
    with db.connect() as conn:
        images = {uid: [Path(p) for p in conn.execute(text(
            "select i.path from images i join studies s on s.id = i.study_id where s.study_instance_uid = :u "
            "order by i.ordinal"), dict(u=uid)).scalars()] for uid in uids}
        timings = {uid: conn.execute(text(
            "select r.timings from reports r join studies s on s.id = r.study_id where s.study_instance_uid = :u "
            "and r.current"), dict(u=uid)).scalar_one() for uid in uids}
    db.dispose()
    ctx = StudyContext(modality="CR", body_part=None, study_description=None, patient_age=None, patient_sex=None)
    engine.probe(images[uids[0]], ctx)  # warm-up, as the workers were warm
    out = []
    for uid in uids:
        started = time.perf_counter()
        engine.probe(images[uid], ctx)
        probe = time.perf_counter() - started
        t = timings[uid]
        t = json.loads(t) if isinstance(t, str) else t
        out.append(probe + sum(float(t.get(k, 0.0)) for k in ("prepare_s", "preprocess_s", "generate_s")))
    engine.close()
    return out


Result = tuple[list[float], list[float], dict[str, list[float]]]


def run_embedded(tmp: Path, model_dir: Path, studies: list[tuple[str, Path]]) -> Result:
    from tests.support.procs import Proc, base_env, free_port, preread_argv, wait_port

    port = free_port()
    work = tmp / "embedded"
    work.mkdir()
    data = work / "preread-data"
    env = base_env(data_dir=data, model=model_dir, port=port, host="127.0.0.1", stable_after=600,
                   min_free_bytes=0, max_images=1, api_port=free_port())
    url = f"sqlite:///{(data / 'preread.db').resolve()}"
    proc = Proc(preread_argv("run", "--no-live"), env, tmp / "embedded.log", cwd=work).start()
    try:
        wait_port(port, 180)
        time.sleep(10)  # workers load their models
        latencies, uids = _send_and_time(port, url, studies)
    finally:
        proc.kill()
    model = _model_seconds(model_dir, url, uids, data)
    return latencies, model, _stages(url, uids, model)


def run_postgres(tmp: Path, model_dir: Path, studies: list[tuple[str, Path]], admin_url: str) -> Result:
    from preread.schemas.database import upgrade
    from tests.support.procs import Proc, RedisServer, base_env, free_port, preread_argv, wait_port

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    dbname = f"preread_latency_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{dbname}"'))
    url = admin_url.rsplit("/", 1)[0] + f"/{dbname}"
    upgrade(url)
    redis = RedisServer(tmp / "redis").start()
    port = free_port()
    env = base_env(data_dir=tmp / "pg-data", database_url=url, broker_url=redis.url, model=model_dir, port=port,
                   host="127.0.0.1", stable_after=600, dispatch_interval=0.2, min_free_bytes=0, max_images=1)
    procs = []
    try:
        for name, argv in [
            ("listener", preread_argv("listen")),
            ("coordinator", preread_argv("coordinate")),
            ("render", preread_argv("worker", "--queues", "render", "--concurrency", "1")),
            ("infer", preread_argv("worker", "--queues", "infer,export", "--concurrency", "2")),
        ]:
            procs.append(Proc(argv, env, tmp / f"pg-{name}.log").start())
        wait_port(port, 180)
        time.sleep(10)
        latencies, uids = _send_and_time(port, url, studies)
        model = _model_seconds(model_dir, url, uids, tmp / "pg-data")
        stages = _stages(url, uids, model)
    finally:
        for p in procs:
            p.kill()
        redis.kill()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
        admin.dispose()
    return latencies, model, stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--only", choices=["embedded", "postgres"], help="run one backend only")
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres", help="admin URL")
    args = parser.parse_args()

    from tests.support.tiny_model import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="preread-latency-"))
    model_dir = build_tiny_model(tmp / "tiny-model")
    results = {}
    if args.only in (None, "embedded"):
        results["embedded (SQLite, file queue)"] = run_embedded(tmp, model_dir, _cr_studies(tmp / "in-embedded", args.studies))
    if args.only in (None, "postgres"):
        results["Postgres + Redis"] = run_postgres(tmp, model_dir, _cr_studies(tmp / "in-pg", args.studies), args.pg)
    table = Table(caption="seconds; pipeline = latency - grace - model time", title=f"bench/latency.py: {args.studies} single-image CR studies, one association each, "
                        f"tiny model, stable_after 600 s, CR grace {GRACE_S:.0f} s")
    for column in ("backend", "latency p50", "latency p95", "model p50", "pipeline p50", "pipeline p95",
                   "goal p95 ≤ 1.5 s"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    for name, (latencies, model, _) in results.items():
        pipeline = [lat - GRACE_S - m for lat, m in zip(latencies, model, strict=True)]
        p95 = _pct(pipeline, 0.95)
        table.add_row(name, f"{statistics.median(latencies):.2f}", f"{_pct(latencies, 0.95):.2f}",
                      f"{statistics.median(model):.2f}", f"{statistics.median(pipeline):.2f}", f"{p95:.2f}",
                      "met" if p95 <= 1.5 else "NOT met")
    console = Console()
    console.print(table)
    steps = Table(title="where the time goes (p50 / p95 per step, seconds)")
    steps.add_column("step", justify="left")
    steps.add_column("what it holds", justify="left")
    for name in results:
        steps.add_column(name, justify="right")
    for step, what in STAGES:
        steps.add_row(step, what, *(f"{statistics.median(r[2][step]):.3f} / {_pct(r[2][step], 0.95):.3f}" for r in results.values()))
    console.print(steps)


if __name__ == "__main__":
    main()
