"""Archive sweep throughput (issue 15): retrieval against the C-MOVE floor, the sweep's own CPU, drafts per minute.

N single-image CR studies (pydicom-data's RG3_UNCR cropped to 512², new UIDs,
one study date) are loaded into a private Orthanc. In the same run:

* **floor**: Orthanc C-MOVEs the studies, one C-MOVE per study, ``max_associations``
  at a time, to dcmtk's ``storescp --ignore`` (receives and discards). Each lane
  asks on one association it keeps, with TCP_NODELAY, as the sweep's own
  associations do; measured before and after the sweep, the faster counts. A
  reference row shows it as this bench first measured it (a new association per
  C-MOVE, Nagle's algorithm delaying each request by the peer's delayed ACK);
* **floor, in lists**: the same, each C-MOVE asking for ``--move-batch`` studies (a list of
  Study Instance UIDs), as the sweep asks (for reference);
* **listener floor**: the C-MOVEs the sweep makes (lists of ``--move-batch``, the fair way) to
  ``preread listen`` (a fresh data dir and database): what storing durably here costs, with no sweep;
* **sweep retrieval**: a :class:`SweepRunner` in this process sweeps the day
  (STUDY-level C-FIND, IMAGE-level counts, C-MOVE to ``preread listen`` running
  as its own process, the count check and the release), without workers, until
  every study is released. Its CPU is this process's CPU over that time: query,
  the C-MOVE requests, bookkeeping and checks (the listener's storing is not in it);
* **drafted** (``--draft``): ``preread sweep run`` with the coordinator and
  render/infer workers on the tiny random-weight model, until the sweep is done.

    python bench/sweep.py [--studies 300] [--move-batch 10] [--no-sync-writes] [--draft] [--draft-studies 300] [--pg URL]

Goal: sweep retrieval >= 0.8 x the floor; the sweep's own CPU <= 20 ms per study.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pydicom  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove  # type: ignore[attr-defined]  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from preread.ingest.listener.transport import no_delay  # noqa: E402
from tests.support.orthanc import Orthanc  # noqa: E402
from tests.support.procs import Proc, base_env, free_port, preread_argv, wait_port, wait_until  # noqa: E402

DAY = date(2023, 6, 1)
T = TypeVar("T")
SIZE = 512


def make_studies(folder: Path, count: int) -> list[Path]:
    """``count`` one-image CR studies, 512x512 crops of a real CR."""
    folder.mkdir(parents=True, exist_ok=True)
    original = pydicom.dcmread(get_testdata_file("RG3_UNCR.dcm"))
    pixels = original.pixel_array[:SIZE, :SIZE].copy()
    original.Rows = original.Columns = SIZE
    original.PixelData = pixels.tobytes()
    files = []
    for i in range(count):
        ds = original.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyDate = DAY.strftime("%Y%m%d")
        ds.StudyTime = f"{(i // 60) % 24:02d}{i % 60:02d}00"
        path = folder / f"cr{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def floor(orthanc: Orthanc, uids: list[str], destination: str, parallel: int, fair: bool = True) -> float:
    """Seconds for Orthanc to C-MOVE every study, one C-MOVE per study, ``parallel`` at once, to ``destination``.

    ``fair``: each of the ``parallel`` lanes asks on one association it keeps, with TCP_NODELAY, as the sweep
    does (``ingest.sweep.dimse``). Otherwise as this bench measured it at first: a new association per C-MOVE,
    and Nagle's algorithm holding each request's identifier back for the peer's delayed ACK (~40 ms a study
    that Orthanc never spends moving anything).
    """
    pending = list(uids)
    lock = threading.Lock()
    failures: list[int] = []

    def associate() -> Any:
        ae = AE(ae_title="BENCH")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        handlers = [(evt.EVT_CONN_OPEN, no_delay)] if fair else []
        assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet, evt_handlers=handlers)
        if not assoc.is_established:
            raise RuntimeError("floor: Orthanc refused the association")
        return assoc

    def worker() -> None:
        assoc = associate() if fair else None
        while True:
            with lock:
                if not pending:
                    break
                uid = pending.pop()
            if not fair:
                assoc = associate()
            ident = Dataset()
            ident.QueryRetrieveLevel = "STUDY"
            ident.StudyInstanceUID = uid
            for status, _ in assoc.send_c_move(ident, destination, StudyRootQueryRetrieveInformationModelMove):
                if status is not None and int(status.Status) not in (0xFF00, 0x0000):
                    failures.append(int(status.Status))
            if not fair:
                assoc.release()
        if fair:
            assoc.release()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"floor C-MOVEs failed: {failures[:3]}")
    return elapsed


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(pid: int, run: Callable[[], T]) -> tuple[T, float]:
    """``run()``'s result and the CPU seconds process ``pid`` used meanwhile."""
    before = cpu_seconds(pid)
    result = run()
    return result, cpu_seconds(pid) - before


def in_lists(uids: list[str], size: int) -> list[str]:
    """The UIDs as C-MOVE identifiers of ``size`` studies each (a multi-valued UID is backslash-separated)."""
    return ["\\".join(uids[i:i + size]) for i in range(0, len(uids), size)]


def sweep_retrieval(tmp: Path, orthanc: Orthanc, listener_port: int, db_url: str, count: int,
                    parallel: int, move_batch: int) -> tuple[float, float, dict[str, int]]:
    """(seconds, CPU seconds of this process, studies by final state) for a runner to be done with every study
    of the day (released, or incomplete or failed after its retries)."""
    from preread.ingest.sweep import ledger
    from preread.ingest.sweep.runner import SweepRunner
    from preread.ingest.sweep.sources import parse_sources
    from preread.schemas.database import session_scope
    from preread.schemas.settings import Settings
    from preread.schemas.tables import SweepStudy

    settings = Settings(data_dir=tmp / "data", database_url=db_url, ae_title="PREREAD", port=listener_port,
                        host="127.0.0.1", min_free_bytes=0)
    source = parse_sources([{"name": "pacs", "kind": "dicom", "ae_title": orthanc.aet, "host": "127.0.0.1",
                             "port": orthanc.dicom_port, "max_associations": parallel, "max_in_flight": count + 1,
                             "move_batch": move_batch}])[0]
    with session_scope(db_url) as session:
        sweep_id = ledger.create_sweep(session, "pacs", DAY, DAY)
        ledger.claim(session, "bench", 3600)
    assert sweep_id is not None
    runner = SweepRunner(sweep_id, settings, source, None, owner="bench")
    by_state = select(SweepStudy.state, func.count()).where(SweepStudy.sweep_id == sweep_id).group_by(SweepStudy.state)
    holding = {str(s) for s in ledger.HOLDING}
    cpu0, started = time.process_time(), time.perf_counter()
    while True:
        runner.step()
        with session_scope(db_url) as session:
            states = {str(state): int(n) for state, n in session.execute(by_state).all()}
        if sum(states.values()) >= count and not holding & set(states):
            break
    return time.perf_counter() - started, time.process_time() - cpu0, states


def drafted(tmp: Path, orthanc_files: list[Path], db_url: str, broker: str | None) -> tuple[int, float]:
    """(studies, seconds) for ``preread sweep run`` to draft a day with coordinator and workers on the tiny model."""
    from tests.support.tiny_model import build_tiny_model

    model = build_tiny_model(tmp / "tiny")
    port = free_port()
    orthanc = Orthanc(tmp, peers={"PREREAD": ("127.0.0.1", port)}).start()
    procs: list[Proc] = []
    try:
        orthanc.upload(orthanc_files)
        config = tmp / "draft.toml"
        config.write_text(f'[[sources]]\nname = "pacs"\nkind = "dicom"\nae_title = "{orthanc.aet}"\n'
                          f'host = "127.0.0.1"\nport = {orthanc.dicom_port}\nmax_in_flight = 8\n')
        env = base_env(data_dir=tmp / "draft-data", database_url=db_url, broker_url=broker, model=model, port=port,
                       host="127.0.0.1", stable_after=1, dispatch_interval=0.2, min_free_bytes=0, max_images=1,
                       config_file=config)
        for name, args in (("listener", ["listen"]), ("coordinator", ["coordinate"]),
                           ("render", ["worker", "--queues", "render", "--concurrency", "1"]),
                           ("infer", ["worker", "--queues", "infer,export", "--concurrency", "2"])):
            procs.append(Proc(preread_argv(*args), env, tmp / f"{name}.log").start())
        wait_port(port, 90)
        started = time.perf_counter()
        done = subprocess.run(preread_argv("sweep", "run", "pacs", "--from", DAY.isoformat(), "--to", DAY.isoformat()),
                              env=env, capture_output=True, text=True, timeout=7200)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        return len(orthanc_files), elapsed
    finally:
        for proc in procs:
            proc.kill()
        orthanc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=300)
    parser.add_argument("--associations", type=int, default=2, help="max_associations of the source (and the floor)")
    parser.add_argument("--move-batch", type=int, default=10, help="studies per C-MOVE of the sweep (the source's move_batch)")
    parser.add_argument("--draft", action="store_true", help="also draft with the tiny model (slow on CPU)")
    parser.add_argument("--draft-studies", type=int, default=300)
    parser.add_argument("--pg", help="Postgres admin URL (default: SQLite, the embedded default)")
    parser.add_argument("--no-sync-writes", action="store_true", help="listener with PREREAD_SYNC_WRITES=false")
    parser.add_argument("--broker", help="broker URL for --draft (default: the embedded queue)")
    args = parser.parse_args()
    from preread.ingest.listener.ae import quiet_pydicom
    from preread.schemas.database import upgrade

    quiet_pydicom()
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp_name:
        tmp = Path(tmp_name)
        files = make_studies(tmp / "in", args.studies)
        uids = [pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in files]
        db_url = args.pg or f"sqlite:///{tmp / 'preread.db'}"
        if args.pg:
            from tests.conftest import _create_pg_database

            db_url = _create_pg_database(f"bench_sweep_{os.getpid()}")
        upgrade(db_url)
        listener_port, discard_port = free_port(), free_port()
        orthanc = Orthanc(tmp, peers={"PREREAD": ("127.0.0.1", listener_port), "DISCARD": ("127.0.0.1", discard_port)})
        orthanc.start()
        storescp = subprocess.Popen(["storescp", "--ignore", "-aet", "DISCARD", str(discard_port)], env=dict(os.environ, TCP_NODELAY="1"),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sync = "false" if args.no_sync_writes else "true"
        env = base_env(data_dir=tmp / "data", database_url=db_url, port=listener_port, host="127.0.0.1",
                       min_free_bytes=0, stable_after=3600, sync_writes=sync)
        listener = Proc(preread_argv("listen"), env, tmp / "listener.log").start()
        try:
            orthanc.upload(files)
            wait_port(discard_port, 30)
            wait_port(listener_port, 90)
            floor_s, floor_cpu = measured(storescp.pid, lambda: floor(orthanc, uids, "DISCARD", args.associations))
            old_floor_s = floor(orthanc, uids, "DISCARD", args.associations, fair=False)
            lists_s, lists_cpu = measured(storescp.pid, lambda: floor(orthanc, in_lists(uids, args.move_batch), "DISCARD",
                                                                      args.associations))
            (sweep_s, cpu_s, states), sweep_listener_cpu = measured(listener.pid, lambda: sweep_retrieval(
                tmp, orthanc, listener_port, db_url, args.studies, args.associations, args.move_batch))
            # the floor once more after the sweep: the faster of the two counts (load on a shared machine varies)
            again_s, again_cpu = measured(storescp.pid, lambda: floor(orthanc, uids, "DISCARD", args.associations))
            if again_s < floor_s:
                floor_s, floor_cpu = again_s, again_cpu
            listener.kill()
            # the listener alone, on a fresh data dir and database: the same C-MOVEs, no sweep
            fresh_db = f"sqlite:///{tmp / 'fresh.db'}"
            upgrade(fresh_db)
            env = base_env(data_dir=tmp / "fresh", database_url=fresh_db, port=listener_port, host="127.0.0.1",
                           min_free_bytes=0, stable_after=3600, sync_writes=sync)
            listener = Proc(preread_argv("listen"), env, tmp / "listener2.log").start()
            wait_port(listener_port, 90)
            listener_s, listener_cpu = measured(listener.pid, lambda: floor(orthanc, in_lists(uids, args.move_batch), "PREREAD",
                                                                            args.associations))
        finally:
            listener.kill()
            storescp.kill()
            orthanc.stop()
        draft = drafted(tmp, make_studies(tmp / "draft-in", args.draft_studies), db_url if not args.pg else db_url,
                        args.broker) if args.draft else None

    n = args.studies

    def ms(seconds: float) -> str:
        return f"{seconds / n * 1000:.1f}"

    table = Table(title=f"archive sweep, {n} single-image CR studies ({SIZE}x{SIZE}), {args.associations} associations, "
                        f"listener sync_writes={sync}, {args.move_batch} studies per sweep C-MOVE")
    for col in ("measure", "studies/min", "ratio to floor", "sweep CPU ms/study", "receiver CPU ms/study", "goal"):
        table.add_column(col, justify="right" if col != "measure" else "left")
    floor_rate, sweep_rate = n / floor_s * 60, n / sweep_s * 60
    table.add_row("floor: Orthanc C-MOVE per study to storescp --ignore", f"{floor_rate:.0f}", "1.00", "", ms(floor_cpu), "")
    old_rate = n / old_floor_s * 60
    table.add_row("  (for reference, the floor as first measured: new association per C-MOVE, Nagle on)",
                  f"{old_rate:.0f}", f"{old_rate / floor_rate:.2f}", "", "", "")
    lists_rate = n / lists_s * 60
    table.add_row(f"  (for reference, the floor in lists: {args.move_batch} studies per C-MOVE)", f"{lists_rate:.0f}",
                  f"{lists_rate / floor_rate:.2f}", "", ms(lists_cpu), "")
    listener_rate = n / listener_s * 60
    table.add_row("listener floor: the sweep's C-MOVEs to preread listen", f"{listener_rate:.0f}",
                  f"{listener_rate / floor_rate:.2f}", "", ms(listener_cpu), "")
    table.add_row("sweep retrieval (query, count, C-MOVE to preread listen, check, release)", f"{sweep_rate:.0f}",
                  f"{sweep_rate / floor_rate:.2f}", ms(cpu_s), ms(sweep_listener_cpu), ">= 0.80; <= 20 ms")
    if draft is not None:
        count, seconds = draft
        table.add_row(f"drafted end to end, tiny model ({count} studies)", f"{count / seconds * 60:.1f}", "", "", "", "")
    Console(width=170).print(table)
    if states.get("released", 0) != n:
        print(f"NOT every study was released: {states}")
    print(f"sweep retrieval / listener floor: {sweep_rate / listener_rate:.2f}; "
          f"/ the floor as first measured: {sweep_rate / old_rate:.2f}")


if __name__ == "__main__":
    main()
