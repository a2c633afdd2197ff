"""Units of the ingest path: safe paths, atomic files, quarantine, structure check, index, stability."""

from __future__ import annotations

import threading
import zlib
from datetime import timedelta
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import delete, func, select, update

from ingest import storage
from ingest.catalog import InstanceIdentity, identity_of, record_instance
from ingest.index import InstanceIndex
from ingest.listener import Malformed, check_structure, header_dataset
from ingest.stability import StabilityMonitor, mark_stable
from schemas.database import engine_for, session_scope
from schemas.tables import Instance, Outbox, Series, Study, StudyState, utcnow
from tests.conftest import testdata

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
        with pytest.raises(storage.UnsafePath):
            storage.instance_path(tmp_path, ident)


def test_instance_path_layout(tmp_path: Path) -> None:
    assert storage.instance_path(tmp_path, GOOD) == tmp_path / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"


def test_write_atomic_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "x.dcm"
    assert storage.write_atomic(target, [b"abc", memoryview(b"def")]) == 6
    assert target.read_bytes() == b"abcdef"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.dcm"]
    with pytest.raises(FileExistsError):
        storage.write_atomic(target, [b"other"], overwrite=False)
    assert target.read_bytes() == b"abcdef"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.dcm"]


def test_store_instance_keeps_the_first_copy(tmp_path: Path) -> None:
    first = storage.store_instance(tmp_path, GOOD, [b"first"])
    again = storage.store_instance(tmp_path, GOOD, [b"second"])
    assert first.written and not again.written
    assert first.path == again.path and first.path.read_bytes() == b"first" and again.size == 5


def test_store_instance_concurrent_duplicates(tmp_path: Path) -> None:
    results: list[storage.StoredFile] = []
    barrier = threading.Barrier(8)

    def store(i: int) -> None:
        barrier.wait()
        results.append(storage.store_instance(tmp_path, GOOD, [f"copy {i}".encode() * 1000]))

    threads = [threading.Thread(target=store, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.written for r in results) == 1
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 1


def test_quarantine_writes_bytes_and_a_reason_without_patient_data(tmp_path: Path) -> None:
    path = storage.quarantine(tmp_path / "q", [b"DICM", b"garbage"], reason="cannot parse: Malformed\nline",
                              calling_ae="MODALITY", transfer_syntax="1.2.840.10008.1.2.1", status=0xC210)
    assert path.read_bytes() == b"DICMgarbage"
    reason = path.with_suffix(".reason.txt").read_text()
    assert "reason: cannot parse: Malformed?line" in reason
    assert "calling_ae: MODALITY" in reason and "status: 0xC210" in reason and "size_bytes: 11" in reason


def test_has_free_space(tmp_path: Path) -> None:
    assert storage.has_free_space(tmp_path / "not" / "yet", 1)
    assert not storage.has_free_space(tmp_path, 10**18)


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


def test_index_fast_path_and_stability_with_reopen(db_url: str, tmp_path: Path) -> None:
    index = InstanceIndex(engine_for(db_url))
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
    assert storage.sweep_temporary(tmp_path, older_than=600) == 1
    assert not old.exists() and fresh.exists() and kept.exists()
