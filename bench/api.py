"""Reading-queue API latency on a large database (issue 13).

Fills a fresh Postgres database with generated studies and their reports,
probe scores, findings, series, instances and images (no model), starts
``preread api`` (uvicorn) on loopback, and times requests from one keep-alive
client: the worklist's first page, a filtered page
(``probe=pneumothorax&min_score=0.5``) and a study view, ``--requests`` each.
Every case is timed in 10 rounds in turn, so that load from other processes
falls on all alike. Baselines measured in the same run: ``/healthz`` (the HTTP
stack's floor, no database, no token, timed in the same rounds) and the same three requests with the reading queue's
indexes (migrations 0004 and 0008) dropped. Then, for each request, the
indexes the server read for it (``pg_stat_user_indexes``, counted around a
few more requests). Goal: p95 < 25 ms for each.

    python bench/api.py                       # 100,000 studies, 500 requests each
    python bench/api.py --studies 20000 --requests 200
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import psycopg
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.procs import Proc, base_env, free_port, preread_argv, wait_until  # noqa: E402

ADMIN_URL = os.environ.get("PREREAD_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
PROBES = ("pneumothorax", "pleural_effusion", "consolidation", "cardiomegaly", "pulmonary_edema", "fracture",
          "free_air", "malpositioned_device")
MODALITIES = (("CR", 0.5), ("CT", 0.3), ("MR", 0.2))
#: The reading queue's own indexes, as migrations 0004 and 0008 make them.
INDEXES = {
    "ix_studies_worklist": "CREATE INDEX ix_studies_worklist ON studies "
                           "(priority DESC, top_probe_score DESC, first_received_at, id)",
    "ix_probe_scores_current_condition": "CREATE INDEX ix_probe_scores_current_condition ON probe_scores "
                                         "(condition, score, study_id) WHERE current",
    "ix_probe_scores_current_study": "CREATE INDEX ix_probe_scores_current_study ON probe_scores "
                                     "(study_id, condition, score) WHERE current",
}
#: A backend reports its statistics when idle at most this long after its last report (Postgres 15+: 10 s).
STATS_FLUSH_S = 11.0


def _copy(conn: psycopg.Connection, table: str, columns: list[str], rows) -> None:  # type: ignore[no-untyped-def]
    with conn.cursor() as cur, cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def fill(db_url: str, n: int, seed: int = 13) -> list[str]:
    """Generated studies with one current report, 8 probe scores, 2 findings, 1 series, 2 instances, 2 images."""
    rng = random.Random(seed)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    uids = [f"1.2.826.0.1.3680043.10.1137.{i}.{rng.randrange(10**9)}" for i in range(1, n + 1)]
    pg = make_url(db_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(pg) as conn:
        studies, reports, probes, findings, series, instances, images = [], [], [], [], [], [], []
        pid = 0
        for i, uid in enumerate(uids, start=1):
            modality = rng.choices([m for m, _ in MODALITIES], [w for _, w in MODALITIES])[0]
            scores = [rng.betavariate(1.2, 6.0) for _ in PROBES]
            priority = rng.choices((0, 1, 2), (0.8, 0.15, 0.05))[0]
            received = now - timedelta(seconds=rng.randrange(30 * 86400))
            studies.append((i, uid, f"A{i:09d}", f"P{i:08d}", f"Generated^Patient{i}", "BENCH", "1970-01-01", "050Y", "F",
                            modality, "CHEST", "Generated study", "DRAFTED", received, priority, max(scores),
                            received, received, received, received, ["routine", "priority", "stat"][priority]))
            reports.append((i, i, True, "Findings:\n- generated\n\nImpression: generated", "generated impression",
                            ["routine", "priority", "stat"][priority], "{}", "ok", "bench/model", "bench-1", received, 2))
            for j, (probe, score) in enumerate(zip(PROBES, scores)):
                pid += 1
                probes.append((pid, i, probe, f"Is there {probe}?", score, True, "bench/model", "bench-1", received))
            for j in range(2):
                findings.append((2 * i - 1 + j, i, j, f"generated finding {j}", "lung", "left", "present", "mild"))
                instances.append((2 * i - 1 + j, i, f"{uid}.1.{j}", "1.2.840.10008.5.1.4.1.1.1", f"/nowhere/{i}/{j}.dcm", j + 1, received))
                images.append((2 * i - 1 + j, i, f"{uid}.1.{j}", j, f"/nowhere/{i}/{j}.png", 512, 512, received))
            series.append((i, i, f"{uid}.1", modality, 1, received))
        _copy(conn, "studies", ["id", "study_instance_uid", "accession_number", "patient_id", "patient_name",
                                "issuer_of_patient_id", "patient_birth_date", "patient_age", "patient_sex", "modalities",
                                "body_part", "study_description", "state", "state_changed_at", "priority",
                                "top_probe_score", "first_received_at", "last_received_at", "created_at", "updated_at",
                                "urgency"], studies)
        _copy(conn, "reports", ["id", "study_id", "current", "draft_text", "impression", "urgency", "raw_output",
                                "parse_status", "model_id", "prompt_version", "created_at", "n_images"], reports)
        _copy(conn, "probe_scores", ["id", "study_id", "condition", "question", "score", "current", "model_id",
                                     "prompt_version", "created_at"], probes)
        _copy(conn, "findings", ["id", "report_id", "ordinal", "text", "anatomy", "laterality", "presence", "severity"], findings)
        _copy(conn, "series", ["id", "study_id", "series_instance_uid", "modality", "series_number", "created_at"], series)
        _copy(conn, "instances", ["id", "series_id", "sop_instance_uid", "sop_class_uid", "path", "instance_number", "received_at"], instances)
        _copy(conn, "images", ["id", "study_id", "sop_instance_uid", "ordinal", "path", "width", "height", "created_at"], images)
        for table in ("studies", "reports", "probe_scores", "findings", "series", "instances", "images"):
            conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE")
    return uids


def timed(client: httpx.Client, paths: list[str]) -> list[float]:
    """Milliseconds per request, as the client sees them; every answer must be 200."""
    out = []
    for path in paths:
        start = time.perf_counter()
        response = client.get(path)
        elapsed = (time.perf_counter() - start) * 1000
        if response.status_code != 200:
            raise SystemExit(f"{path}: HTTP {response.status_code}: {response.text[:200]}")
        out.append(elapsed)
    return out


#: Each variant's requests are timed in this many rounds, every case in each, so that load from other
#: processes drifting over the run falls on all cases alike.
ROUNDS = 10
FLOOR = "/healthz (floor: HTTP, no DB, no token)"


def interleaved(client: httpx.Client, cases: dict[str, list[str]]) -> dict[str, list[float]]:
    """Milliseconds per request for each case, measured in ROUNDS rounds (after 30 warm-up requests each)."""
    for paths in cases.values():
        timed(client, paths[:30])
    out: dict[str, list[float]] = {label: [] for label in cases}
    for r in range(ROUNDS):
        for label, paths in cases.items():
            out[label] += timed(client, paths[r::ROUNDS])
    return out


def index_scans(db_url: str) -> dict[str, int]:
    """Index scans so far, by index name, as the statistics system has them."""
    with create_engine(db_url, isolation_level="AUTOCOMMIT").connect() as conn:
        conn.execute(text("SELECT pg_stat_clear_snapshot()"))
        rows = conn.execute(text("SELECT indexrelname, idx_scan FROM pg_stat_user_indexes"))
        return {name: scans for name, scans in rows}


def indexes_read(client: httpx.Client, db_url: str, paths: list[str]) -> list[str]:
    """The indexes the API's queries read while serving ``paths`` (after its backends report their statistics)."""
    before = index_scans(db_url)
    timed(client, paths)
    time.sleep(STATS_FLUSH_S)
    after = index_scans(db_url)
    return sorted(name for name, scans in after.items() if scans > before.get(name, 0))


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    args = parser.parse_args()

    name = f"preread_bench_api_{uuid.uuid4().hex[:8]}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    db_url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    work = Path(f"/tmp/{name}")
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    settings = dict(database_url=db_url, data_dir=work / "data", api_port=port)
    api = None
    try:
        from preread.schemas.database import upgrade

        upgrade(db_url)
        t0 = time.perf_counter()
        uids = fill(db_url, args.studies)
        print(f"filled {args.studies} studies (+ reports, 8 probes each, findings, series, instances, images) "
              f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        import subprocess

        token = subprocess.run(preread_argv("token", "create", "bench", "--role", "read"), env=base_env(**settings),
                               capture_output=True, text=True, check=True).stdout.strip()
        api = Proc(preread_argv("api", "--log-level", "warning"), base_env(**settings), work / "api.log").start()
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200, 120, what="the API")
        rng = random.Random(7)
        n = args.requests
        cases = {
            "worklist, first page (50)": ["/api/v1/worklist"] * n,
            "filtered page (probe=pneumothorax&min_score=0.5)": ["/api/v1/worklist?probe=pneumothorax&min_score=0.5"] * n,
            "study view": [f"/api/v1/studies/{rng.choice(uids)}" for _ in range(n)],
        }
        results: dict[str, dict[str, list[float]]] = {}
        used: dict[str, list[str]] = {}
        load_before = os.getloadavg()[0]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
            for variant in ("with indexes", "without the indexes"):
                if variant.startswith("without"):
                    with create_engine(db_url, isolation_level="AUTOCOMMIT").connect() as conn:
                        for index in INDEXES:
                            conn.execute(text(f"DROP INDEX {index}"))
                        conn.execute(text("ANALYZE"))
                    measured = interleaved(client, cases)
                else:
                    measured = interleaved(client, {FLOOR: ["/healthz"] * n, **cases})
                    floor = measured.pop(FLOOR)
                for label, values in measured.items():
                    results.setdefault(label, {})[variant] = values
                if variant == "with indexes":
                    print("timed with indexes; asking Postgres which indexes each request read", file=sys.stderr)
                    time.sleep(STATS_FLUSH_S)  # the timed requests' last statistics land first
                    for label, paths in cases.items():
                        used[label] = indexes_read(client, db_url, paths[:20])
            with create_engine(db_url, isolation_level="AUTOCOMMIT").connect() as conn:
                for ddl in INDEXES.values():
                    conn.execute(text(ddl))
        f50, f95 = p(floor, 50), p(floor, 95)
        print(f"\nreading-queue API, {args.studies:,} studies on Postgres, {n} keep-alive requests each, one client on loopback, "
              f"{ROUNDS} rounds of every case in turn ({os.cpu_count()} CPUs, load average {load_before:.1f} -> "
              f"{os.getloadavg()[0]:.1f})\n")
        header = f"| {'request':50} | {'p50 ms':>7} | {'p95 ms':>7} | {'p95 / healthz p95':>17} | {'p95 goal':>8} | {'no-index p50':>12} | {'no-index p95':>12} |"
        print(header)
        print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
        print(f"| {FLOOR:50} | {f50:7.2f} | {f95:7.2f} | {1.0:17.1f} | {'':>8} | {'':>12} | {'':>12} |")
        for label, variants in results.items():
            w, wo = variants["with indexes"], variants["without the indexes"]
            ok = "met" if p(w, 95) < 25 else "MISSED"
            print(f"| {label:50} | {p(w, 50):7.2f} | {p(w, 95):7.2f} | {p(w, 95) / f95:17.1f} | {ok:>8} | {p(wo, 50):12.2f} | {p(wo, 95):12.2f} |")
        print("\nthe reading queue's indexes (migrations 0004, 0008), dropped for the no-index columns:")
        for ddl in INDEXES.values():
            print(f"- `{ddl}`")
        print("\nindexes each request read (pg_stat_user_indexes, 20 more requests each):")
        for label, names in used.items():
            print(f"- {label}: " + ", ".join(f"**{i}**" if i in INDEXES else i for i in names))
    finally:
        if api is not None:
            api.kill()
        if not args.keep:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
