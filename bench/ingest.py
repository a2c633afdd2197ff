"""Ingest benchmark: dcmtk ``storescu`` into three receivers, in one run.

500 CT instances of 512x512 (cloned from pydicom-data's ``693_UNCR.dcm`` with
new UIDs) are sent over one association, then over 4 associations at once, to

(a) a bare pynetdicom SCP that discards what it receives (the ceiling for a
    pynetdicom receiver on this machine),
(a') the same SCP on the listener's pynetdicom plumbing (``ingest/listener/transport.py``: the gate,
    recv_into, C-STORE-RSP encoded directly, no per-PDU debug handlers), so
    that the cost of keeping instances shows apart from the plumbing's gain,
(b) ``preread listen`` (and ``preread listen --workers 2`` for 4 associations),
    power-loss safe (``sync_writes`` on, the default),
(b') the same with ``PREREAD_SYNC_WRITES=false``: safe against a killed
    process but not against an OS crash or power loss (no fsync, SQLite
    ``synchronous=NORMAL``, Postgres ``synchronous_commit=off``),
(c) Orthanc with a temporary configuration, when ``/usr/sbin/Orthanc`` exists.

Prints one table of instances/s, then the durable-write floor: what writing
one instance-sized file crash-safely (write, fsync, link, fsync of the
folder) costs on this disk with no DICOM at all, against (a)'s time per
instance. Usage::

    .venv/bin/python bench/ingest.py [--count 500] [--postgres ADMIN_URL] [--repeat N]

With ``--repeat N`` every bare and preread figure is the best of N runs
(a shared machine's noise only ever slows a run down).

The embedded SQLite database is used unless ``--postgres`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.procs import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PREREAD = [sys.executable, "-m", "preread.cli.main"]
ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
STORESCU = shutil.which("storescu")
ECHOSCU = shutil.which("echoscu")


def make_instances(folder: Path, count: int) -> list[Path]:
    """``count`` CT instances of one series, each a 512x512 clone of pydicom-data's 693_UNCR with new UIDs."""
    from pydicom.data import get_testdata_file

    from tests.support.listener import clone_series

    source = get_testdata_file("693_UNCR.dcm")
    if source is None:
        raise SystemExit("pydicom-data is needed (693_UNCR.dcm)")
    return clone_series(Path(source), folder, count)


def wait_echo(port: int, aet: str, timeout: float = 60.0) -> None:
    """Poll with echoscu until the receiver answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = subprocess.run([ECHOSCU, "-aec", aet, "-to", "2", "127.0.0.1", str(port)], capture_output=True)
        if done.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"no C-ECHO answer on port {port}")


def send(port: int, aet: str, groups: list[list[Path]]) -> float:
    """Send each group over its own storescu association, all at once; returns seconds."""
    started = time.perf_counter()
    procs = [
        subprocess.Popen([STORESCU, "-aec", aet, "-nh", "127.0.0.1", str(port), *map(str, group)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for group in groups
    ]
    errors = [p.communicate()[1] for p in procs]
    elapsed = time.perf_counter() - started
    for proc, err in zip(procs, errors):
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
    return elapsed


def size_of(paths: list[Path]) -> float:
    """Mean file size in bytes."""
    return sum(p.stat().st_size for p in paths) / len(paths)


def split(paths: list[Path], n: int) -> list[list[Path]]:
    """``n`` groups of about equal size."""
    return [paths[i::n] for i in range(n)]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 15 s."""
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


BARE_SCP = """
import sys, logging
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
sys.path.insert(0, {root!r})
from preread.ingest.listener.ae import TRANSFER_SYNTAXES, MAX_PDU_SIZE, MAX_ASSOCIATIONS
logging.getLogger("pynetdicom").setLevel(logging.WARNING)
ae = AE(ae_title="BARE")
ae.maximum_associations = MAX_ASSOCIATIONS
ae.maximum_pdu_size = MAX_PDU_SIZE
ae.add_supported_context(Verification)
for cx in AllStoragePresentationContexts:
    ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
def discard(event):
    event.encoded_dataset()
    return 0x0000
kwargs = {{}}
if {lean!r}:
    from preread.ingest.listener import gate, transport as dimse
    dimse.quiet_pynetdicom()
    kwargs.update(request_handler=dimse.ListenerRequestHandler, server_class=dimse.ListenerServer,
                  door=gate.Door(1000, dimse.MAX_WAITING, MAX_ASSOCIATIONS))
ae.make_server(("127.0.0.1", {port}), evt_handlers=[(evt.EVT_C_STORE, discard)], **kwargs).serve_forever()
"""


def run_bare(paths: list[Path], lean: bool = False) -> tuple[float, float]:
    """(a) instances/s over 1 and 4 associations into a discarding pynetdicom SCP ((a') with ``lean``)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", BARE_SCP.format(root=str(ROOT), port=port, lean=lean)])
    try:
        wait_echo(port, "BARE")
        one = len(paths) / send(port, "BARE", [paths])
        four = len(paths) / send(port, "BARE", split(paths, 4))
    finally:
        stop(proc)
    return one, four


#: Durable SCPs without a database, to compare pynetdicom plumbings: each keeps every instance as a
#: Part 10 file in ``{store}``, fsynced and linked into place, before it answers.
DOCUMENTED_SCP = """
import os, sys, logging, tempfile
from pathlib import Path
from pynetdicom import AE, AllStoragePresentationContexts, evt, _config
from pynetdicom.sop_class import Verification
sys.path.insert(0, {root!r})
from preread.ingest.listener.ae import TRANSFER_SYNTAXES, MAX_PDU_SIZE, MAX_ASSOCIATIONS
logging.getLogger("pynetdicom").setLevel(logging.WARNING)
store = Path({store!r}); (store / "tmp").mkdir(parents=True, exist_ok=True)
tempfile.tempdir = str(store / "tmp")  # the data set file on the storage file system, so that it can be linked
_config.STORE_RECV_CHUNKED_DATASET = True
_config.LOG_HANDLER_LEVEL = "none"
ae = AE(ae_title="DOC")
ae.maximum_associations = MAX_ASSOCIATIONS
ae.maximum_pdu_size = MAX_PDU_SIZE
ae.add_supported_context(Verification)
for cx in AllStoragePresentationContexts:
    ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
folder = os.open(store, os.O_RDONLY)
def keep(event):
    path = event.dataset_path
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    os.link(path, store / (str(event.request.AffectedSOPInstanceUID) + ".dcm"))
    os.fsync(folder)
    return 0x0000
ae.make_server(("127.0.0.1", {port}), evt_handlers=[(evt.EVT_C_STORE, keep)]).serve_forever()
"""

PLUMBING_SCP = """
import os, sys, logging
from pathlib import Path
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
sys.path.insert(0, {root!r})
from preread.ingest.listener.ae import TRANSFER_SYNTAXES, MAX_PDU_SIZE, MAX_ASSOCIATIONS
from preread.ingest.listener import gate, transport
from preread.ingest.listener.handlers import open_spool, IngestContext
from preread.ingest.storage.files import FilePool, write_atomic
from preread.ingest.storage.part10 import file_meta_bytes
logging.getLogger("pynetdicom").setLevel(logging.WARNING)
store = Path({store!r}); store.mkdir(parents=True, exist_ok=True)
transport.quiet_pynetdicom()
ae = AE(ae_title="OURS")
ae.maximum_associations = MAX_ASSOCIATIONS
ae.maximum_pdu_size = MAX_PDU_SIZE
ae.add_supported_context(Verification)
for cx in AllStoragePresentationContexts:
    ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
ctx = IngestContext(storage_dir=store, quarantine_dir=store, min_free_bytes=0, index=None, file_pool=FilePool(store))
def keep(event):
    request = event.request
    path = store / (str(request.AffectedSOPInstanceUID) + ".dcm")
    spool = transport.take_spool(event.assoc, request.MessageID)
    if spool is None:  # no pooled file was ready: the data set is in memory, as in the listener
        meta = file_meta_bytes(str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
                               str(event.context.transfer_syntax))
        write_atomic(path, [meta, request.DataSet.getbuffer()], overwrite=False, pool=ctx.file_pool)
    else:
        spool.commit(path)
    return 0x0000
ae.make_server(("127.0.0.1", {port}), evt_handlers=[(evt.EVT_C_STORE, keep)], server_class=transport.ListenerServer,
               request_handler=transport.ListenerRequestHandler, door=gate.Door(1000, transport.MAX_WAITING, MAX_ASSOCIATIONS),
               spool_opener=open_spool(ctx)).serve_forever()
"""


def run_plumbing(paths: list[Path], script: str, aet: str) -> tuple[float, float]:
    """Instances/s over 1 and 4 associations into a durable SCP without a database."""
    results = []
    for groups in (1, 4):
        with tempfile.TemporaryDirectory(prefix="bench-plumbing-") as store:
            port = free_port()
            proc = subprocess.Popen([sys.executable, "-c", script.format(root=str(ROOT), port=port, store=store)])
            try:
                wait_echo(port, aet)
                results.append(len(paths) / send(port, aet, split(paths, groups)))
                kept = len(list(Path(store).glob("*.dcm")))
                if kept != len(paths):
                    raise RuntimeError(f"{aet} kept {kept} of {len(paths)} instances")
            finally:
                stop(proc)
    return results[0], results[1]


@contextlib.contextmanager
def fresh_database(admin_url: str | None) -> Iterator[str | None]:
    """A new empty Postgres database on the server of ``admin_url`` (dropped afterwards), or None."""
    if not admin_url:
        yield None
        return
    from sqlalchemy import create_engine, text

    name = f"preread_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def run_preread(paths: list[Path], workers: int, admin_url: str | None, groups: int, sync_writes: bool = True) -> float:
    """(b) instances/s into ``preread listen --workers N`` with a fresh data dir and database."""
    with tempfile.TemporaryDirectory(prefix="preread-bench-") as tmp, fresh_database(admin_url) as database_url:
        port = free_port()
        env = dict(os.environ, PREREAD_DATA_DIR=tmp, PREREAD_PORT=str(port), PREREAD_HOST="127.0.0.1",
                   PREREAD_MIN_FREE_BYTES=str(64 * 1024 * 1024), PREREAD_LOG_LEVEL="WARNING",
                   PREREAD_SYNC_WRITES="true" if sync_writes else "false")
        env.pop("PREREAD_ALLOWED_AES", None)
        if database_url:
            env["PREREAD_DATABASE_URL"] = database_url
        proc = subprocess.Popen([*PREREAD, "listen", "--workers", str(workers), "--log-level", "WARNING"],
                                cwd=ROOT, env=env)
        try:
            wait_echo(port, "PREREAD")
            # two warm-up instances so that first-connection costs are not timed
            send(port, "PREREAD", [paths[:2]])
            rate = (len(paths) - 2) / send(port, "PREREAD", split(paths[2:], groups))
            stored = sum(1 for _ in Path(tmp, "studies").rglob("*.dcm"))
            if stored != len(paths):
                raise RuntimeError(f"preread stored {stored} of {len(paths)} instances")
        finally:
            stop(proc)
    return rate


def run_orthanc(paths: list[Path]) -> tuple[float, float] | None:
    """(c) instances/s into Orthanc with a temporary configuration, or ``None`` when absent."""
    if ORTHANC is None:
        return None
    results = []
    for groups in (1, 4):
        with tempfile.TemporaryDirectory(prefix="orthanc-bench-") as tmp:
            port, http = free_port(), free_port()
            config = {
                "Name": "bench", "StorageDirectory": f"{tmp}/storage", "IndexDirectory": f"{tmp}/index",
                "DicomAet": "ORTHANC", "DicomPort": port, "HttpPort": http, "RemoteAccessAllowed": False,
                "DicomCheckCalledAet": False, "Plugins": [], "StableAge": 60, "HttpServerEnabled": True,
                "DicomThreadsCount": 4,
            }
            Path(tmp, "orthanc.json").write_text(json.dumps(config))
            proc = subprocess.Popen([ORTHANC, f"{tmp}/orthanc.json"], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            try:
                wait_echo(port, "ORTHANC")
                results.append(len(paths) / send(port, "ORTHANC", split(paths, groups)))
            finally:
                stop(proc)
    return results[0], results[1]


def durable_write_ms(size: int, count: int = 100) -> float:
    """Milliseconds to write one ``size``-byte file crash-safely here (temporary file, fsync, link, folder fsync)."""
    payload = os.urandom(size)
    with tempfile.TemporaryDirectory(prefix="bench-fsync-", dir=tempfile.gettempdir()) as tmp:
        folder = os.open(tmp, os.O_RDONLY)
        try:
            started = time.perf_counter()
            for i in range(count):
                fd = os.open(os.path.join(tmp, f".{i}.tmp"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
                os.write(fd, payload)
                os.fsync(fd)
                os.close(fd)
                os.rename(os.path.join(tmp, f".{i}.tmp"), os.path.join(tmp, f"{i}.dcm"))
                os.fsync(folder)
            return (time.perf_counter() - started) / count * 1000
        finally:
            os.close(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=1, help="best of N runs for (a) and (b) figures")
    parser.add_argument("--postgres", default=None, metavar="ADMIN_URL",
                        help="run preread on a fresh Postgres database per run, created through this admin URL "
                             "(e.g. postgresql+psycopg://postgres@127.0.0.1:5432/postgres); default: embedded SQLite")
    parser.add_argument("--plumbing", action="store_true",
                        help="only compare pynetdicom's documented chunked receive (STORE_RECV_CHUNKED_DATASET, "
                             "event.dataset_path hard-linked) with the listener's transport, both durable, no database")
    args = parser.parse_args()
    if not STORESCU or not ECHOSCU:
        raise SystemExit("dcmtk's storescu and echoscu are needed (apt install dcmtk)")
    if args.plumbing:
        plumbing(args.count, args.repeat)
        return

    with tempfile.TemporaryDirectory(prefix="bench-ct-") as tmp:
        paths = make_instances(Path(tmp), args.count)
        size = size_of(paths)
        bare1 = bare4 = lean1 = lean4 = pre1 = pre4 = pre4w = fast1 = fast4 = fast4w = 0.0
        floor = float("inf")
        for _ in range(max(1, args.repeat)):  # rounds of every receiver, so that slow spells hit all alike
            one, four = run_bare(paths)
            bare1, bare4 = max(bare1, one), max(bare4, four)
            one, four = run_bare(paths, lean=True)
            lean1, lean4 = max(lean1, one), max(lean4, four)
            floor = min(floor, durable_write_ms(int(size_of(paths))))
            pre1 = max(pre1, run_preread(paths, 1, args.postgres, 1))
            fast1 = max(fast1, run_preread(paths, 1, args.postgres, 1, sync_writes=False))
            pre4 = max(pre4, run_preread(paths, 1, args.postgres, 4))
            fast4 = max(fast4, run_preread(paths, 1, args.postgres, 4, sync_writes=False))
            pre4w = max(pre4w, run_preread(paths, 2, args.postgres, 4))
            fast4w = max(fast4w, run_preread(paths, 2, args.postgres, 4, sync_writes=False))
        orthanc = run_orthanc(paths)

    db = "Postgres" if args.postgres else "SQLite (embedded)"
    print(f"\n{args.count} CT instances, 512x512, {size / 1024:.0f} KiB each, dcmtk storescu, {os.cpu_count()} CPUs, "
          f"preread database: {db}{f', best of {args.repeat} runs' if args.repeat > 1 else ''}\n")
    print("| receiver | 1 association | 4 associations |")
    print("|---|---:|---:|")
    print(f"| (a) bare pynetdicom SCP, discards | {bare1:.0f}/s | {bare4:.0f}/s |")
    print(f"| (a') the same on the listener's lean plumbing | {lean1:.0f}/s | {lean4:.0f}/s |")
    print(f"| (b) preread listen | {pre1:.0f}/s ({pre1 / bare1:.2f}x a) | {pre4:.0f}/s |")
    print(f"| (b) preread listen --workers 2 | | {pre4w:.0f}/s ({pre4w / pre1:.2f}x b, 1 assoc) |")
    print(f"| (b') preread listen, PREREAD_SYNC_WRITES=false | {fast1:.0f}/s ({fast1 / bare1:.2f}x a) | {fast4:.0f}/s |")
    print(f"| (b') preread listen --workers 2, PREREAD_SYNC_WRITES=false | | "
          f"{fast4w:.0f}/s ({fast4w / fast1:.2f}x b', 1 assoc) |")
    if orthanc:
        print(f"| (c) Orthanc {orthanc_version()} | {orthanc[0]:.0f}/s | {orthanc[1]:.0f}/s |")
    else:
        print("| (c) Orthanc | not installed | |")
    per_instance = 1000 / bare1
    print(f"\nDurable-write floor: one {size / 1024:.0f} KiB file written crash-safely (write, fsync, rename, "
          f"folder fsync) takes {floor:.2f} ms here, with no DICOM at all: {floor / per_instance:.0%} of (a)'s "
          f"{per_instance:.2f} ms per instance; (b) at 0.85x (a) leaves {per_instance / 0.85 - per_instance:.2f} ms.")


def plumbing(count: int, repeat: int) -> None:
    """The documented way against the listener's transport, each durable, in rounds (best of ``repeat``)."""
    with tempfile.TemporaryDirectory(prefix="bench-ct-") as tmp:
        paths = make_instances(Path(tmp), count)
        size = size_of(paths)
        doc1 = doc4 = ours1 = ours4 = 0.0
        for _ in range(max(1, repeat)):
            one, four = run_plumbing(paths, DOCUMENTED_SCP, "DOC")
            doc1, doc4 = max(doc1, one), max(doc4, four)
            one, four = run_plumbing(paths, PLUMBING_SCP, "OURS")
            ours1, ours4 = max(ours1, one), max(ours4, four)
    print(f"\n{count} CT instances, {size / 1024:.0f} KiB each, dcmtk storescu, durable (file fsynced, linked, folder "
          f"fsynced), no database{f', best of {repeat} runs' if repeat > 1 else ''}\n")
    print("| pynetdicom plumbing | 1 association | 4 associations |")
    print("|---|---:|---:|")
    print(f"| (d) documented: STORE_RECV_CHUNKED_DATASET, event.dataset_path linked | {doc1:.0f}/s | {doc4:.0f}/s |")
    print(f"| (e) transport.py: gate, bounded reads, spool as fragments arrive | {ours1:.0f}/s ({ours1 / doc1:.2f}x d) "
          f"| {ours4:.0f}/s ({ours4 / doc4:.2f}x d) |")


def orthanc_version() -> str:
    """Orthanc's version string, or ''."""
    try:
        out = subprocess.run([ORTHANC, "--version"], capture_output=True, text=True, timeout=10).stdout
        return out.split()[1] if out.split() else ""
    except Exception:
        return ""


if __name__ == "__main__":
    main()
