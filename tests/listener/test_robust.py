"""The listener under abuse: 500+ malformed datasets, and SIGKILL in the middle of a transfer."""

from __future__ import annotations

import os
import random
import struct
import threading
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    BasicTextSRStorage,
    CTImageStorage,
    EncapsulatedPDFStorage,
    Verification,
)

from tests.conftest import testdata
from tests.support.listener import (
    clone_series,
    echo,
    listener_factory,  # noqa: F401  (fixture)
    raw_send,  # noqa: F401  (fixture)
    wait_for,
)

PATIENT_NAME = "Zyxwvut^Patient^Secret"
PATIENT_ID = "PID-SECRET-4711"

BAD_UIDS = ["../../etc", "..", "1.2.3/../../x", "", "1..2", "1.2.a", "9" * 65, "1.2.3\x00/", "/etc/passwd",
            "1.2.3 4", ".1.2", "1.2.", "%2e%2e", "1.2.3\\4"]


def _base() -> Dataset:
    ds = dcmread(testdata("CT_small.dcm"))
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    return ds


def _encode(ds: Dataset) -> bytes:
    """The explicit VR little endian encoding of ``ds`` without file meta."""
    buffer = BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True, enforce_file_format=False)
    return buffer.getvalue()


def _element_offsets(data: bytes) -> list[tuple[int, int]]:
    """(offset of the length field, its width) of each top-level explicit VR LE element."""
    from preread.ingest.listener.structure import _LONG_VRS

    offsets, pos = [], 0
    while pos + 8 <= len(data):
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            length = struct.unpack_from("<L", data, pos + 8)[0]
            offsets.append((pos + 8, 4))
            pos += 12 + (0 if length == 0xFFFFFFFF else length)
            if length == 0xFFFFFFFF:
                break
        else:
            length = struct.unpack_from("<H", data, pos + 6)[0]
            offsets.append((pos + 6, 2))
            pos += 8 + length
    return offsets


def _write(folder: Path, index: int, dataset_bytes: bytes, sop_class: str, sop_instance: str | None = None) -> Path:
    """A file whose meta is valid (so pynetdicom sends it raw) and whose dataset is ``dataset_bytes``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    head = BytesIO()
    from pydicom.filewriter import write_file_meta_info

    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)  # type: ignore[arg-type]
    path = folder / f"m{index:04d}.dcm"
    path.write_bytes(head.getvalue() + dataset_bytes)
    return path


def malformed_corpus(folder: Path, seed: int = 20261127) -> list[tuple[Path, str]]:
    """At least 500 malformed or mutated datasets, each with the kind of damage done."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    base = _base()
    good = _encode(base)
    offsets = _element_offsets(good)
    items: list[tuple[bytes, str, str, str | None]] = []

    for _ in range(110):  # truncated anywhere
        items.append((good[: rng.randrange(0, len(good) - 1)], CTImageStorage, "truncated", None))
    for _ in range(110):  # random bytes flipped in the header
        data = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(0, min(len(data), 3000))] = rng.randrange(256)
        items.append((bytes(data), CTImageStorage, "flipped", None))
    for _ in range(100):  # wrong declared lengths, huge ones included
        data = bytearray(good)
        where, width = rng.choice(offsets)
        value = rng.choice([0xFFFFFFF0, 0x7FFFFFFF, 0xFFFFFFFE, 0x10000000, rng.randrange(0, 1 << (8 * width))])
        value &= (1 << (8 * width)) - 1
        data[where : where + width] = value.to_bytes(width, "little")
        items.append((bytes(data), CTImageStorage, "length", None))
    for bad in BAD_UIDS:  # invalid identity: path traversal and malformed UIDs
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            ds = _base()
            ds[keyword].value = bad
            items.append((_encode(ds), CTImageStorage, f"uid {keyword}", None))
        ds = _base()
        del ds[rng.choice(["StudyInstanceUID", "SeriesInstanceUID"])]
        items.append((_encode(ds), CTImageStorage, "uid missing", None))
    for _ in range(40):  # pixel data with a huge or undefined length and no delimiter
        data = bytearray(good)
        tag = struct.pack("<HH", 0x7FE0, 0x0010)
        at = data.rfind(tag)
        data[at + 8 : at + 12] = rng.choice([0xFFFFFFFF, 0xFFFFFFF0, len(good) * 4]).to_bytes(4, "little")
        items.append((bytes(data), CTImageStorage, "pixel length", None))
    for _ in range(40):  # noise
        items.append((rng.randbytes(rng.randrange(1, 4000)), CTImageStorage, "noise", None))
    for i in range(30):  # non-image SOP classes: valid ones must be stored, broken ones refused
        ds = Dataset()
        ds.SOPClassUID = BasicTextSRStorage if i % 2 else EncapsulatedPDFStorage
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.PatientName, ds.PatientID, ds.Modality = PATIENT_NAME, PATIENT_ID, "SR" if i % 2 else "DOC"
        if ds.SOPClassUID == EncapsulatedPDFStorage:
            ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
            ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
        data = _encode(ds)
        kind = "non-image valid"
        if i % 3 == 0:
            data, kind = data[: len(data) // 2], "non-image truncated"
        items.append((data, ds.SOPClassUID, kind, ds.SOPInstanceUID))
    for _ in range(20):  # dataset UIDs that are valid but differ from the request's
        items.append((good, CTImageStorage, "mismatch", None))  # the file meta gets a fresh SOP Instance UID

    corpus = []
    for i, (data, sop_class, kind, sop_instance) in enumerate(items):
        corpus.append((_write(folder, i, data, sop_class, sop_instance), kind))
    assert len(corpus) >= 500
    return corpus


def _ae() -> AE:
    ae = AE(ae_title="FUZZER")
    for sop_class in (CTImageStorage, BasicTextSRStorage, EncapsulatedPDFStorage, Verification):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


@pytest.mark.slow
def test_500_malformed_datasets_refused_and_listener_keeps_serving(listener_factory, raw_send, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lp = listener_factory()
    corpus = malformed_corpus(tmp_path / "corpus")
    ae = _ae()
    statuses: dict[str, list[int]] = {}
    aborted = 0
    for start in range(0, len(corpus), 200):  # a few associations
        assoc = ae.associate("127.0.0.1", lp.port, ae_title="PREREAD")
        assert assoc.is_established
        for path, kind in corpus[start : start + 200]:
            rsp = assoc.send_c_store(path)
            if "Status" not in rsp:
                aborted += 1
                assoc = ae.associate("127.0.0.1", lp.port, ae_title="PREREAD")
                continue
            statuses.setdefault(kind, []).append(int(rsp.Status))
        assoc.release()
    assert aborted == 0

    flat = [s for values in statuses.values() for s in values]
    assert len(flat) == len(corpus)
    assert all(s == 0x0000 or 0xC000 <= s <= 0xCFFF for s in flat), sorted(set(flat))
    failures = sum(1 for s in flat if s != 0)
    assert failures >= 400
    for kind in ("truncated", "length", "pixel length", "noise", "mismatch", "non-image truncated"):
        assert all(s != 0 for s in statuses[kind]), kind
    assert all(s != 0 for k, v in statuses.items() if k.startswith("uid") for s in v)
    assert all(s == 0 for s in statuses["non-image valid"])

    # refused bytes are in quarantine, each with a reason file free of patient data
    quarantined = lp.quarantined()
    assert len(quarantined) == failures
    for path in quarantined[:50]:
        reason = path.with_suffix(".reason.txt").read_text()
        assert "reason:" in reason and "calling_ae: FUZZER" in reason
        assert PATIENT_NAME.split("^")[0] not in reason and PATIENT_ID not in reason
    log = lp.log()
    assert PATIENT_NAME.split("^")[0] not in log and PATIENT_ID not in log

    # stored files sit only at studies/<uid>/<uid>/<uid>.dcm
    from preread.ingest.assembly.catalog import is_valid_uid

    for path in lp.stored_files():
        rel = path.relative_to(lp.data_dir / "studies")
        assert len(rel.parts) == 3 and all(is_valid_uid(p) for p in (*rel.parts[:2], rel.stem))
    assert lp.query("select count(*) from instances")[0][0] == len(lp.stored_files()) == len(flat) - failures

    # still serving: C-ECHO and a good instance
    assert lp.alive() and echo(lp.port)
    good = clone_series(testdata("CT_small.dcm"), tmp_path / "good", 1)[0]
    assoc = ae.associate("127.0.0.1", lp.port, ae_title="PREREAD")
    assert assoc.send_c_store(good).Status == 0x0000
    assoc.release()
    uid = dcmread(good, stop_before_pixels=True).SOPInstanceUID
    assert lp.query("select count(*) from instances where sop_instance_uid = :u", u=uid)[0][0] == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sync_writes", "sqlite"),
    [("true", False), ("false", False), ("false", True)],
    ids=["sync-postgres", "nosync-postgres", "nosync-sqlite"],
)
def test_sigkill_mid_transfer_loses_nothing_acknowledged(listener_factory, raw_send, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                         sync_writes: str, sqlite: bool) -> None:
    # PREREAD_SYNC_WRITES=false gives up power-loss safety, never kill -9 safety: the page cache outlives the process
    lp = listener_factory(PREREAD_STABLE_AFTER="2", PREREAD_SYNC_WRITES=sync_writes, sqlite=sqlite)
    files = clone_series(testdata("CT_small.dcm"), tmp_path / "series", 300)
    study_uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    acknowledged: list[Path] = []
    ae = _ae()
    assoc = ae.associate("127.0.0.1", lp.port, ae_title="PREREAD")
    assert assoc.is_established

    killed = threading.Event()

    def killer() -> None:
        wait_for(lambda: len(acknowledged) >= 80, timeout=120, interval=0.001, what="80 acknowledged")
        lp.kill9()  # while the next C-STORE is in flight
        killed.set()

    thread = threading.Thread(target=killer)
    thread.start()
    for path in files:
        rsp = assoc.send_c_store(path)
        if rsp.get("Status") is None:
            break
        assert rsp.Status == 0x0000
        acknowledged.append(path)
    thread.join(30)
    assert killed.is_set()
    assoc.abort()
    assert 80 <= len(acknowledged) < len(files)

    # after a restart every acknowledged instance is on disk, complete, and indexed
    lp.start()
    rows = {r.sop_instance_uid: r.path for r in lp.query("select sop_instance_uid, path from instances")}
    for path in acknowledged:
        sent = dcmread(path)
        assert sent.SOPInstanceUID in rows, path.name
        assert dcmread(rows[sent.SOPInstanceUID]) == sent
    # the study, left RECEIVING by the killed process, still becomes STABLE
    wait_for(lambda: lp.query("select state from studies where study_instance_uid = :u", u=study_uid)[0][0] == "STABLE",
             timeout=30, what="study STABLE after restart")
    assert lp.query("select count(*) from outbox")[0][0] == 1

    # the rest can be sent again; duplicates of acknowledged ones are fine
    assoc = ae.associate("127.0.0.1", lp.port, ae_title="PREREAD")
    for path in files[len(acknowledged) - 5 :]:
        assert assoc.send_c_store(path).Status == 0x0000
    assoc.release()
    assert lp.query("select count(*) from instances")[0][0] == len(files)
    assert len(lp.stored_files()) == len(files)


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.slow
def test_transfer_broken_off_mid_data_set_keeps_nothing_and_leaks_nothing(listener_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # the listener writes a data set to an unnamed spool file as its fragments arrive: a peer that aborts
    # half-way must leave neither a stored file nor an open descriptor behind
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu import P_DATA_TF

    lp = listener_factory(sqlite=True)
    files = clone_series(testdata("CT_small.dcm"), tmp_path / "series", 6)
    ae = _ae()
    assoc = ae.associate("127.0.0.1", lp.port, ae_title="PREREAD")
    assert assoc.send_c_store(files[0]).Status == 0x0000  # warm: pool, database connection
    assoc.release()
    assert lp.proc is not None
    wait_for(lambda: len(lp.stored_files()) == 1, timeout=10, what="first instance stored")
    baseline = _open_fds(lp.proc.pid)

    for path in files[1:4]:
        ds = dcmread(path)
        raw = path.read_bytes()
        (meta_length,) = struct.unpack_from("<L", raw, 140)  # (0002,0000) File Meta Information Group Length
        body = raw[144 + meta_length:]  # the data set as encoded in the file
        assoc = ae.associate("127.0.0.1", lp.port, ae_title="PREREAD")
        assert assoc.is_established
        context = next(cx for cx in assoc.accepted_contexts
                       if cx.abstract_syntax == ds.SOPClassUID and cx.transfer_syntax[0] == ds.file_meta.TransferSyntaxUID)
        request = C_STORE()
        request.MessageID = 1
        request.AffectedSOPClassUID = ds.SOPClassUID
        request.AffectedSOPInstanceUID = ds.SOPInstanceUID
        request.Priority = 2
        request.DataSet = BytesIO(body)
        message = C_STORE_RQ()
        message.primitive_to_message(request)
        pdatas = list(message.encode_msg(context.context_id, 4096))
        sock = assoc.dul.socket.socket
        for pdata in pdatas[: len(pdatas) // 2]:  # the command and half the data set, then gone
            pdu = P_DATA_TF()
            pdu.from_primitive(pdata)
            sock.sendall(pdu.encode())
        time.sleep(0.3)
        assoc.abort()

    assert echo(lp.port)
    assoc = ae.associate("127.0.0.1", lp.port, ae_title="PREREAD")
    assert assoc.send_c_store(files[4]).Status == 0x0000  # and a whole instance still goes in
    assoc.release()
    stored = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in lp.stored_files()}
    assert stored == {dcmread(files[i], stop_before_pixels=True).SOPInstanceUID for i in (0, 4)}
    wait_for(lambda: _open_fds(lp.proc.pid) <= baseline, timeout=10, what="descriptors back to the baseline")
