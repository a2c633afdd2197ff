"""Units of the ingest path: safe paths, atomic files, quarantine, structure check, index, stability."""

from __future__ import annotations

import threading
import time
import zlib
from datetime import timedelta
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import delete, func, select, update

from preread.ingest.storage import files, layout, quarantine, space
from preread.ingest.storage.spool import Spool
from preread.ingest.assembly.catalog import (
    InstanceIdentity,
    InvalidIdentity,
    identity_of,
    record_instance,
)
from preread.ingest.assembly.index import InstanceIndex
from preread.ingest.listener.structure import (
    Malformed,
    check_structure,
    header_dataset,
    raw_identity,
)
from preread.ingest.storage.part10 import file_meta_bytes
from preread.ingest.assembly.stability import StabilityMonitor, mark_stable
from preread.schemas.database import engine_for, session_scope
from preread.schemas.tables import Instance, Outbox, Series, Study, StudyState, utcnow
from tests.conftest import testdata
from tests.support.procs import wait_until

GOOD = InstanceIdentity("1.2.3", "1.2.3.4", "1.2.3.4.5", "1.2.840.10008.5.1.4.1.1.2")


def _encoded(name: str) -> tuple[bytes, bytes, str]:
    """(whole file, dataset bytes, transfer syntax) of a test file."""
    from pydicom.filereader import _read_file_meta_info, read_preamble  # type: ignore[attr-defined]

    data = testdata(name).read_bytes()
    fp = BytesIO(data)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    return data, data[fp.tell() :], str(meta.TransferSyntaxUID)


# --- paths and files ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["../../etc", "..", "1.2/../3", "", "1..2", "1.2.", "a.b", "9" * 65, "1.2\x00", "/etc/passwd", "1.2 3"]
)
def test_instance_path_rejects_unsafe_uids(tmp_path: Path, bad: str) -> None:
    for ident in (
        InstanceIdentity(bad, "1.2", "1.3", "1.4"),
        InstanceIdentity("1.1", bad, "1.3", "1.4"),
        InstanceIdentity("1.1", "1.2", bad, "1.4"),
    ):
        with pytest.raises(layout.UnsafePath):
            layout.instance_path(tmp_path, ident)


def test_instance_path_layout(tmp_path: Path) -> None:
    assert layout.instance_path(tmp_path, GOOD) == tmp_path / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"


def test_write_atomic_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "x.dcm"
    assert files.write_atomic(target, [b"abc", memoryview(b"def")]) == 6
    assert target.read_bytes() == b"abcdef"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.dcm"]
    with pytest.raises(FileExistsError):
        files.write_atomic(target, [b"other"], overwrite=False)
    assert target.read_bytes() == b"abcdef"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.dcm"]


def test_store_instance_keeps_the_first_copy(tmp_path: Path) -> None:
    first = layout.store_instance(tmp_path, GOOD, [b"first"])
    again = layout.store_instance(tmp_path, GOOD, [b"second"])
    assert first.written and not again.written
    assert first.path == again.path and first.path.read_bytes() == b"first" and again.size == 5


def test_store_instance_concurrent_duplicates(tmp_path: Path) -> None:
    results: list[layout.StoredFile] = []
    barrier = threading.Barrier(8)

    def store(i: int) -> None:
        barrier.wait()
        results.append(layout.store_instance(tmp_path, GOOD, [f"copy {i}".encode() * 1000]))

    threads = [threading.Thread(target=store, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.written for r in results) == 1
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 1


def test_quarantine_writes_bytes_and_a_reason_without_patient_data(tmp_path: Path) -> None:
    path = quarantine.quarantine(tmp_path / "q", [b"DICM", b"garbage"], reason="cannot parse: Malformed\nline",
                              calling_ae="MODALITY", transfer_syntax="1.2.840.10008.1.2.1", status=0xC210)
    assert path.read_bytes() == b"DICMgarbage"
    reason = path.with_suffix(".reason.txt").read_text()
    assert "reason: cannot parse: Malformed?line" in reason
    assert "calling_ae: MODALITY" in reason and "status: 0xC210" in reason and "size_bytes: 11" in reason


def test_has_free_space(tmp_path: Path) -> None:
    assert space.has_free_space(tmp_path / "not" / "yet", 1)
    assert not space.has_free_space(tmp_path, 10**18)


# --- structure check and fast header ------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm", "JPEG-LL.dcm",
     "MR_small_RLE.dcm", "emri_small.dcm", "693_J2KR.dcm", "US1_J2KI.dcm", "bad_sequence.dcm"],
)
def test_check_structure_accepts_real_files_and_header_matches_dcmread(name: str) -> None:
    data, stream, ts = _encoded(name)
    found = check_structure(stream, ts)
    fast = header_dataset(data, found, ts)
    full = dcmread(BytesIO(data), stop_before_pixels=True)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        assert fast.get(keyword) == full.get(keyword), keyword
    for keyword in ("Modality", "InstanceNumber", "NumberOfFrames", "StudyDate", "PatientSex"):
        assert str(fast.get(keyword)) == str(full.get(keyword)), keyword


def test_check_structure_refuses_damage() -> None:
    _, stream, ts = _encoded("CT_small.dcm")
    for cut in (1, 7, 100, len(stream) // 2, len(stream) - 1):
        with pytest.raises(Malformed):
            check_structure(stream[:cut], ts)
    with pytest.raises(Malformed):
        check_structure(stream + b"\x00\x00", ts)
    huge = bytearray(stream)
    huge[6:8] = b"\xff\xff"  # first element's 2-byte length
    with pytest.raises(Malformed):
        check_structure(bytes(huge), ts)
    with pytest.raises(Malformed):
        check_structure(b"\x08\x00\x18\x00UI\x00\x01" + b"1" * 10, ts)
    _, dfl, dfl_ts = _encoded("image_dfl.dcm")
    with pytest.raises(Malformed):
        check_structure(dfl[: len(dfl) // 2] + b"\xff" * 8, dfl_ts)
    assert check_structure(zlib.compress(b"", 9)[2:-4], dfl_ts) == {}  # an empty deflated data set


# --- index and stability, on Postgres and SQLite ---------------------------------------------


def _ds(study: str, series: str, number: int = 1):  # type: ignore[no-untyped-def]
    ds = dcmread(testdata("CT_small.dcm"), stop_before_pixels=True)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
    ds.InstanceNumber = number
    return ds


def _age_studies(url: str, seconds: float) -> None:
    with session_scope(url) as session:
        session.execute(update(Study).values(last_received_at=utcnow() - timedelta(seconds=seconds)))


@pytest.mark.parametrize(
    ("sync_writes", "driver_sql"), [(True, True), (False, True), (True, False)], ids=["sync", "nosync", "core"]
)
def test_index_fast_path_and_stability_with_reopen(db_url: str, tmp_path: Path, sync_writes: bool,
                                                   driver_sql: bool) -> None:
    index = InstanceIndex(engine_for(db_url, sync_writes=sync_writes, pre_ping=False))
    if not driver_sql:  # the SQLAlchemy Core statements other drivers get
        index._raw = index._postgres = False
    study, series = generate_uid(), generate_uid()
    first = _ds(study, series, 1)
    assert index.record(first, identity_of(first), tmp_path / "a.dcm", 10, "1.2.840.10008.1.2.1")
    for n in range(2, 6):  # cached series: the two-statement path
        ds = _ds(study, series, n)
        assert index.record(ds, identity_of(ds), tmp_path / f"{n}.dcm", 10, "1.2.840.10008.1.2.1")
    assert not index.record(first, identity_of(first), tmp_path / "a.dcm", 10, "1.2.840.10008.1.2.1")  # duplicate

    with session_scope(db_url) as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 5
        row = session.execute(select(Study)).scalar_one()
        assert row.modalities == "CT" and row.state == StudyState.RECEIVING

    with session_scope(db_url) as session:  # not quiet long enough yet
        assert mark_stable(session, 30) == []
    _age_studies(db_url, 60)
    with session_scope(db_url) as session:
        assert len(mark_stable(session, 30)) == 1
    with session_scope(db_url) as session:
        assert mark_stable(session, 30) == []  # once only
        assert session.execute(select(Study.state)).scalar_one() == StudyState.STABLE
        outbox = session.execute(select(Outbox)).scalars().all()
        assert [(o.topic, o.payload["study_instance_uid"]) for o in outbox] == [("render", study)]

    late = _ds(study, series, 6)  # fast path re-opens the STABLE study
    assert index.record(late, identity_of(late), tmp_path / "6.dcm", 10, "1.2.840.10008.1.2.1")
    with session_scope(db_url) as session:
        assert session.execute(select(Study.state)).scalar_one() == StudyState.RECEIVING
    _age_studies(db_url, 60)
    with session_scope(db_url) as session:
        assert len(mark_stable(session, 30)) == 1
        session.execute(update(Study).values(state=StudyState.DRAFTED))

    other = _ds(study, generate_uid(), 1)  # a new series re-opens through ingest.catalog too
    assert index.record(other, identity_of(other), tmp_path / "o.dcm", 10, "1.2.840.10008.1.2.1")
    with session_scope(db_url) as session:
        assert session.execute(select(Study.state)).scalar_one() == StudyState.RECEIVING
        assert session.scalar(select(func.count()).select_from(Outbox)) == 2

    # rows deleted behind the cache: the index falls back to the full upsert
    with session_scope(db_url) as session:
        session.execute(delete(Study))
    again = _ds(study, series, 7)
    assert index.record(again, identity_of(again), tmp_path / "7.dcm", 10, "1.2.840.10008.1.2.1")
    with session_scope(db_url) as session:
        assert session.scalar(select(func.count()).select_from(Series)) == 1


def test_monitors_in_parallel_flip_each_study_once(db_url: str, tmp_path: Path) -> None:
    with session_scope(db_url) as session:
        for i in range(60):
            ds = _ds(generate_uid(), generate_uid())
            record_instance(session, ds, tmp_path / f"{i}.dcm", 1)
    _age_studies(db_url, 120)
    flipped: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def monitor() -> None:
        try:
            barrier.wait()
            for _ in range(3):
                with session_scope(db_url) as session:
                    flipped.extend(mark_stable(session, 30))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=monitor) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(flipped) == sorted(set(flipped)) and len(flipped) == 60
    with session_scope(db_url) as session:
        assert session.scalar(select(func.count()).select_from(Outbox)) == 60
        assert session.scalar(select(func.count()).select_from(Study).where(Study.state == "STABLE")) == 60


def test_stability_monitor_thread(sqlite_url: str, tmp_path: Path) -> None:
    with session_scope(sqlite_url) as session:
        record_instance(session, _ds(generate_uid(), generate_uid()), tmp_path / "x.dcm", 1)
    monitor = StabilityMonitor(sqlite_url, stable_after=0.2, interval=0.05)
    monitor.start()
    try:
        import time

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with session_scope(sqlite_url) as session:
                if session.execute(select(Study.state)).scalar_one() == StudyState.STABLE:
                    break
            time.sleep(0.05)
    finally:
        monitor.stop()
    with session_scope(sqlite_url) as session:
        assert session.execute(select(Study.state)).scalar_one() == StudyState.STABLE


def test_sweep_temporary_removes_only_old_leftovers(tmp_path: Path) -> None:
    import os
    import time

    old = tmp_path / "a" / ".x.dcm.0123.tmp"
    fresh = tmp_path / "a" / ".y.dcm.4567.tmp"
    kept = tmp_path / "a" / "z.dcm"
    old.parent.mkdir()
    for path in (old, fresh, kept):
        path.write_bytes(b"x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert files.sweep_temporary(tmp_path, older_than=600) == 1
    assert not old.exists() and fresh.exists() and kept.exists()


# --- the fast paths and sync_writes ------------------------------------------------------


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax"),
    [("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1"),
     ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.45", "1.2.840.10008.1.2"),
     ("1.2", "1." + "9" * 62, "1.2.840.10008.1.2.4.50")],
)
def test_file_meta_bytes_is_what_pynetdicom_encodes(sop_class: str, sop_instance: str, syntax: str) -> None:
    from pydicom.uid import UID
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    meta = create_file_meta(sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_instance),
                            transfer_syntax=UID(syntax))
    assert file_meta_bytes(sop_class, sop_instance, syntax) == b"\x00" * 128 + b"DICM" + encode_file_meta(meta)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "way"),
    [
        ("CT_small.dcm", "fast"),
        ("MR_small_implicit.dcm", "fast"),
        ("image_dfl.dcm", "fast"),
        ("JPEG-LL.dcm", "fast"),
        ("MR_small_bigendian.dcm", "slow"),  # big endian UI values: left to identity_of
        ("bad_sequence.dcm", "refused"),  # its Study Instance UID is not a UID
    ],
)
def test_raw_identity_agrees_with_identity_of(name: str, way: str) -> None:
    data, stream, ts = _encoded(name)
    found = check_structure(stream, ts)
    raw = raw_identity(found)
    if way == "refused":
        assert raw is None
        with pytest.raises(InvalidIdentity, match="StudyInstanceUID"):
            identity_of(header_dataset(data, found, ts))
        return
    slow = identity_of(header_dataset(data, found, ts))
    assert raw == (slow if way == "fast" else None)


def test_raw_identity_leaves_odd_values_to_identity_of() -> None:
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    def found(study: bytes) -> dict:  # type: ignore[type-arg]
        values = {"StudyInstanceUID": study, "SeriesInstanceUID": b"1.2.3\x00", "SOPInstanceUID": b"1.2.4",
                  "SOPClassUID": b"1.2.840.10008.5.1.4.1.1.2\x00"}
        return {int(Tag(k)): RawDataElement(Tag(k), "UI", len(v), v, 0, False, True) for k, v in values.items()}

    assert raw_identity(found(b"1.2")) == InstanceIdentity("1.2", "1.2.3", "1.2.4", "1.2.840.10008.5.1.4.1.1.2")
    # one trailing NUL is padding; a space, CR or LF anywhere, an inner NUL or two NULs are not
    for bad in (b"1.2\\1.3", b"../x", b"", b"1.2 \x00", "1.\u00e9".encode(), b"1.2 ", b"1.2\n", b"1.2\r",
                b"1.2\n\x00", b"1.\x002", b"1.2\x00\x00"):
        assert raw_identity(found(bad)) is None


def test_write_atomic_without_sync_never_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fsync(fd: int) -> None:
        raise AssertionError("fsync with sync=False")

    monkeypatch.setattr(files.os, "fsync", no_fsync)
    stored = layout.store_instance(tmp_path, GOOD, [b"abc", memoryview(b"def")], sync=False)
    assert stored.written and stored.path.read_bytes() == b"abcdef"
    assert not layout.store_instance(tmp_path, GOOD, [b"other"], sync=False).written
    assert quarantine.quarantine(tmp_path / "q", [b"bad"], reason="r", sync=False).read_bytes() == b"bad"
    with pytest.raises(AssertionError):
        files.write_atomic(tmp_path / "synced.dcm", [b"x"])


def test_write_atomic_many_chunks(tmp_path: Path) -> None:
    chunks = [bytes([i]) * (i * 1000) for i in range(40)] + [memoryview(b""), b"end"]
    target = tmp_path / "many.dcm"
    assert files.write_atomic(target, chunks) == sum(len(c) for c in chunks)
    assert target.read_bytes() == b"".join(bytes(c) for c in chunks)


def test_sync_writes_setting_reaches_the_database(db_url: str) -> None:
    from sqlalchemy import text

    safe, fast = engine_for(db_url), engine_for(db_url, sync_writes=False, pre_ping=False)
    if db_url.startswith("sqlite"):
        query, expected = "PRAGMA synchronous", (2, 1)  # FULL, NORMAL
    else:
        query, expected = "SHOW synchronous_commit", ("on", "off")
    with safe.connect() as conn:
        assert conn.execute(text(query)).scalar() == expected[0]
    with fast.connect() as conn:
        assert conn.execute(text(query)).scalar() == expected[1]


def test_index_survives_a_dropped_server_connection(pg_url: str, tmp_path: Path) -> None:
    from sqlalchemy import text

    engine = engine_for(pg_url, sync_writes=False, pre_ping=False)
    index = InstanceIndex(engine)
    study, series = generate_uid(), generate_uid()
    for n in range(1, 4):
        ds = _ds(study, series, n)
        assert index.record(ds, identity_of(ds), tmp_path / f"{n}.dcm", 10, "1.2.840.10008.1.2.1")
    with engine_for(pg_url).connect() as conn:  # the server drops the index's pooled connections
        conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()"))
    ds = _ds(study, series, 4)
    assert index.record(ds, identity_of(ds), tmp_path / "4.dcm", 10, "1.2.840.10008.1.2.1")
    with session_scope(pg_url) as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 4


def test_file_pool_writes_link_in_place_and_leave_no_temporary_names(tmp_path: Path) -> None:
    import time

    pool = files.FilePool(tmp_path)
    try:
        assert pool.supported  # ext4, xfs, btrfs and tmpfs all have O_TMPFILE
        deadline = time.monotonic() + 5
        while pool._ready.qsize() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        stored = layout.store_instance(tmp_path, GOOD, [b"abc", memoryview(b"def")], pool=pool)
        assert stored.written and stored.path.read_bytes() == b"abcdef"
        assert stored.path.stat().st_mode & 0o777 == 0o640 & ~_umask()
        with pytest.raises(FileExistsError):  # first copy wins, as with named temporary files
            files.write_atomic(stored.path, [b"other"], overwrite=False, pool=pool)
        assert stored.path.read_bytes() == b"abcdef"
        names = [p.name for p in tmp_path.rglob("*")]
        assert not [n for n in names if n.endswith(".tmp")]
    finally:
        pool.close()
    # a closed pool hands out nothing; writers fall back to named temporary files
    assert pool.take() is None
    other = InstanceIdentity("1.2.3", "1.2.3.4", "1.2.3.4.6", GOOD.sop_class_uid)
    assert layout.store_instance(tmp_path, other, [b"x"], pool=pool).path.read_bytes() == b"x"


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC210, 0xB000])
@pytest.mark.parametrize("sop_instance", ["1.2.3.4", "1.2.3.45", None])
def test_c_store_rsp_bytes_are_what_pynetdicom_encodes(status: int, sop_instance: str | None) -> None:
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE

    from preread.ingest.listener.transport import encode_c_store_rsp

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    if sop_instance:
        rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    (pdata,) = list(message.encode_msg(1, 16384))
    assert pdata.presentation_data_value_list == [(1, b"\x03" + encode_c_store_rsp(rsp))]


def test_c_store_rsp_with_an_error_comment_is_left_to_pynetdicom() -> None:
    from pynetdicom.dimse_primitives import C_STORE

    from preread.ingest.listener.transport import encode_c_store_rsp

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.Status = 0xC210
    rsp.ErrorComment = "cannot parse"
    assert encode_c_store_rsp(rsp) is None


def _ready_spool(pool: files.FilePool) -> Spool:
    """A spool, once the pool (filled in the background) has a file ready."""
    return wait_until(lambda: Spool.open(pool), 30, interval=0.01, what="a ready pooled file")


def test_spool_commits_its_bytes_once_and_keeps_the_first_copy(tmp_path: Path) -> None:
    pool = files.FilePool(tmp_path)
    try:
        spool = _ready_spool(pool)
        spool.head = b"HEAD"
        for part in (spool.head, b"abc", memoryview(b"defg")):
            spool.write(part)
        with spool.data_set() as view:
            assert bytes(view) == b"abcdefg"
        first = layout.store_instance(tmp_path, GOOD, [], spool=spool)
        assert first.written and first.path.read_bytes() == b"HEADabcdefg"
        again = _ready_spool(pool)
        again.write(b"other")
        assert not layout.store_instance(tmp_path, GOOD, [], spool=again).written
        assert first.path.read_bytes() == b"HEADabcdefg"
        assert [p.name for p in first.path.parent.iterdir()] == [first.path.name]  # no stray file
    finally:
        pool.close()
