"""``preread listen`` against a hostile peer on the same network (issue 11): one test per defect found.

The attacker needs no AE title, no certificate and few bytes. Attack sockets
come from 127.0.0.2 (another address on loopback), the allowed callers from
127.0.0.1. No assertion on wall-clock times: latencies are ``bench/hostile.py``'s.
"""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import threading
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from tests.conftest import testdata
from tests.listener.test_access import _client_context, pki  # noqa: F401  (fixture)
from tests.support.listener import (
    association_request,
    closed_by_peer,
    echo,
    echo_request_pdata,
    listener_factory,  # noqa: F401  (fixture)
    needs_dcmtk,
    raw_send,  # noqa: F401  (fixture)
    read_pdu,
    reset_rss_peak,
    rss_now,
    rss_peak_since_reset,
    wait_for,
)

ATTACKER = "127.0.0.2"
MiB = 1024 * 1024
PATIENT_NAME = "Zyxwvut^Patient^Secret"


def _attack_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind((ATTACKER, 0))
    return sock


def _ae(title: str = "GOODSCU") -> AE:
    ae = AE(ae_title=title)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


def _write_part10(path: Path, ds: Dataset, body: bytes | None = None) -> Path:
    """``ds`` (or ``body``, its encoding) as a Part 10 file with valid meta, so pynetdicom sends it raw."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    head = BytesIO()
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)  # type: ignore[arg-type]
    if body is None:
        body = dataset_body(ds)
    path.write_bytes(head.getvalue() + body)
    return path


@needs_dcmtk
@pytest.mark.slow
def test_idle_and_connect_close_sockets_do_not_lock_out_an_allowed_caller(listener_factory) -> None:  # type: ignore[no-untyped-def]
    lp = listener_factory(PREREAD_ALLOWED_AES="ECHOSCU,GOODSCU")
    held: list[socket.socket] = []
    stop = threading.Event()

    def connect_close() -> None:
        for _ in range(400):  # bounded
            if stop.is_set():
                return
            sock = _attack_socket()
            try:
                sock.connect(("127.0.0.1", lp.port))
            except OSError:
                pass
            sock.close()
            time.sleep(0.02)

    for _ in range(120):  # idle sockets that never send a byte
        sock = _attack_socket()
        sock.connect(("127.0.0.1", lp.port))
        held.append(sock)
    churn = threading.Thread(target=connect_close)
    churn.start()
    try:
        results = []
        for _ in range(20):  # an allowed caller echoes every 0.5 s, with echoscu's normal timeouts
            results.append(echo(lp.port, calling="GOODSCU", timeout=10))
            time.sleep(0.5)
    finally:
        stop.set()
        churn.join(60)
        for sock in held:
            sock.close()
    assert results == [True] * 20
    log = lp.log()
    assert f"connection from {ATTACKER}" in log and "association request timeout" in log
    assert f"connection from {ATTACKER} refused: connection limit reached" in log


def test_declared_length_bombs_cost_no_memory_and_are_closed(listener_factory) -> None:  # type: ignore[no-untyped-def]
    lp = listener_factory()
    assert lp.proc is not None
    reset_rss_peak(lp.proc.pid)
    before = rss_now(lp.proc.pid)
    bombs = []
    for pdu_type in (0x01, 0x04, 0x01):  # 10 bytes each, declaring 1 GiB
        sock = _attack_socket()
        sock.connect(("127.0.0.1", lp.port))
        sock.sendall(struct.pack(">BBL", pdu_type, 0, 1 << 30) + b"\x00" * 4)
        bombs.append(sock)
    try:
        assert all(closed_by_peer(sock, timeout=30) for sock in bombs)
    finally:
        for sock in bombs:
            sock.close()
    assert echo(lp.port)
    assert rss_peak_since_reset(lp.proc.pid) - before < 100 * MiB
    assert "exceeds 65536" in lp.log() or "not an association request" in lp.log()


def test_silent_connections_do_not_delay_a_tls_association(listener_factory, pki: Path) -> None:  # type: ignore[no-untyped-def]
    lp = listener_factory(
        start=False,
        PREREAD_TLS_CERT=str(pki / "server.pem"),
        PREREAD_TLS_KEY=str(pki / "server.key"),
        PREREAD_TLS_CA=str(pki / "ca.pem"),
        PREREAD_ASSOCIATION_REQUEST_TIMEOUT="60",  # the silent sockets outlive the test's echo
    )
    lp.start(wait=False)
    wait_for(lambda: lp.alive() and "listening as" in lp.log(), timeout=60, what="listener up")
    silent = []
    for _ in range(3):
        sock = _attack_socket()
        sock.connect(("127.0.0.1", lp.port))
        silent.append(sock)
    try:
        ae = _ae()
        assoc = ae.associate("127.0.0.1", lp.port, ae_title="PREREAD", tls_args=(_client_context(pki), "127.0.0.1"))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        # the TLS echo was served while every silent connection was still waiting for its handshake
        assert not any(closed_by_peer(sock, timeout=0.2) for sock in silent)
    finally:
        for sock in silent:
            sock.close()


def test_listen_backlog_is_at_least_128(listener_factory) -> None:  # type: ignore[no-untyped-def]
    lp = listener_factory()
    out = subprocess.run(["ss", "-ltnH", f"sport = :{lp.port}"], capture_output=True, text=True, check=True).stdout
    backlogs = [int(line.split()[2]) for line in out.splitlines() if line.strip()]
    assert backlogs and min(backlogs) >= 128, out


@pytest.mark.slow
def test_300_mb_first_instance_of_a_series_is_not_copied_in_memory(listener_factory, raw_send, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lp = listener_factory()
    assert lp.proc is not None
    frames, rows, columns = 300, 1024, 1024
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.PatientID, ds.Modality, ds.NumberOfFrames = "BIG", "CT", frames
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = rows, columns, 1, 8, 8, 7
    ds.PixelRepresentation, ds.PhotometricInterpretation = 0, "MONOCHROME2"
    path = _write_part10(tmp_path / "big.dcm", ds)
    size = frames * rows * columns
    with path.open("r+b") as fp:  # Pixel Data, OB, 300 MiB of zeros (a sparse file: cheap to make)
        fp.seek(0, 2)
        fp.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, size))
        fp.truncate(fp.tell() + size)
    reset_rss_peak(lp.proc.pid)
    before = rss_now(lp.proc.pid)
    assoc = _ae().associate("127.0.0.1", lp.port, ae_title="PREREAD")
    try:
        assert assoc.send_c_store(path).Status == 0x0000
    finally:
        assoc.release()
    growth = rss_peak_since_reset(lp.proc.pid) - before
    assert growth < 100 * MiB, f"RSS grew by {growth / MiB:.0f} MiB for a {size / MiB:.0f} MiB instance"
    rows_ = lp.query("select size_bytes from instances where sop_instance_uid = :u", u=ds.SOPInstanceUID)
    assert rows_ and rows_[0][0] > size  # stored whole


def test_pdu_longer_than_advertised_is_answered_with_a_abort(listener_factory) -> None:  # type: ignore[no-untyped-def]
    lp = listener_factory()
    with socket.create_connection(("127.0.0.1", lp.port)) as sock:
        sock.sendall(association_request())
        answer = read_pdu(sock)
        assert answer is not None and answer[0] == 0x02  # A-ASSOCIATE-AC
        sock.sendall(struct.pack(">BBL", 0x04, 0, 100 * MiB) + b"\x00" * 65536)  # P-DATA claiming 100 MiB
        answer = read_pdu(sock)
        assert answer is not None and answer[0] == 0x07, answer  # A-ABORT
        assert closed_by_peer(sock)
    assert "exceeds the negotiated maximum" in lp.log()
    assert echo(lp.port)


BAD_UIDS = {
    "StudyInstanceUID": ["1.2.3\n", "1.2.34\n", "1.2..3", "1.2\x00.3", "1.2.3\x00\x00"],  # 1.2.34\n: then a NUL pad
    "SeriesInstanceUID": ["4.5.6\n", "4.5.6\r", "1." + "2" * 63, " 4.5.6"],
    "SOPInstanceUID": ["1.2.840.99\r", "1.2.840.99 "],
}


def with_raw_uid(ds: Dataset, keyword: str, value: str) -> bytes:
    """``ds`` encoded with ``value`` as the exact bytes of ``keyword`` (pydicom's writer would strip it)."""
    placeholder = "1." + "9" * (len(value) - 2)
    ds[keyword].value = placeholder
    body = dataset_body(ds)
    assert body.count(placeholder.encode()) == 1
    return body.replace(placeholder.encode(), value.encode("latin-1"))


def test_uids_with_whitespace_nul_empty_component_or_65_characters_are_refused(listener_factory, raw_send,  # type: ignore[no-untyped-def]
                                                                              tmp_path: Path) -> None:
    lp = listener_factory()
    ae = _ae()
    assoc = ae.associate("127.0.0.1", lp.port, ae_title="PREREAD")
    try:
        for keyword, values in BAD_UIDS.items():
            for value in values:
                ds = dcmread(testdata("CT_small.dcm"))
                ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
                # the request (from the file meta) carries a valid SOP Instance UID; the data set may not
                path = _write_part10(tmp_path / "bad.dcm", ds, body=with_raw_uid(ds, keyword, value))
                status = assoc.send_c_store(path).Status
                assert status == 0xC220, (keyword, value, hex(status))
        # leading zeros in a component: not standard, but real archives hold them
        ds = dcmread(testdata("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = "1.2.03", "1.2.03.4", generate_uid()
        assert assoc.send_c_store(_write_part10(tmp_path / "zero.dcm", ds)).Status == 0x0000
    finally:
        assoc.release()
    stored = lp.stored_files()
    assert [p.relative_to(lp.data_dir / "studies").parts[:2] for p in stored] == [("1.2.03", "1.2.03.4")]
    assert lp.query("select count(*) from instances")[0][0] == 1


def dataset_body(ds: Dataset) -> bytes:
    """The explicit VR little endian encoding of ``ds``'s elements alone (no preamble, no file meta)."""
    encoded = BytesIO()
    Dataset(ds).save_as(encoded, implicit_vr=False, little_endian=True, enforce_file_format=False)
    return encoded.getvalue()


def test_structural_errors_name_offsets_never_patient_bytes(listener_factory, raw_send, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lp = listener_factory()
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    body = bytearray(dataset_body(ds))
    at = body.find(b"\x08\x00\x18\x00UI")  # SOP Instance UID, just before Patient Name
    (length,) = struct.unpack_from("<H", body, at + 6)
    struct.pack_into("<H", body, at + 6, length + 8)  # 8 too long: the walk lands on the name's first bytes
    assert body[at + 8 + length + 8 : at + 8 + length + 12] == b"Zyxw"
    path = _write_part10(tmp_path / "m.dcm", ds, body=bytes(body))
    assoc = _ae().associate("127.0.0.1", lp.port, ae_title="PREREAD")
    try:
        assert assoc.send_c_store(path).Status == 0xC210
    finally:
        assoc.release()
    [quarantined] = lp.quarantined()
    reason = quarantined.with_suffix(".reason.txt").read_text()
    for text in (lp.log(), reason):
        assert "invalid VR at offset" in text
        assert "795A" not in text.upper() and "7778" not in text and "Zyxw" not in text
        assert not re.search(r"\([0-9A-F]{4},[0-9A-F]{4}\)", text)


def test_called_ae_title_is_checked(listener_factory) -> None:  # type: ignore[no-untyped-def]
    lp = listener_factory()
    assoc = _ae().associate("127.0.0.1", lp.port, ae_title="WHATEVER")
    assert assoc.is_rejected and not assoc.is_established
    rejection = assoc.acceptor.primitive
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (0x01, 0x01, 0x07)
    assert "called AE not recognised" in lp.log()
    assoc = _ae().associate("127.0.0.1", lp.port, ae_title="PREREAD")
    assert assoc.is_established
    assoc.release()

    anyone = listener_factory(PREREAD_CALLED_AES="*")
    assoc = _ae().associate("127.0.0.1", anyone.port, ae_title="WHATEVER")
    assert assoc.is_established
    assoc.release()


def test_rejected_caller_sending_request_and_data_at_once_gets_a_rejection_not_a_traceback(listener_factory) -> None:  # type: ignore[no-untyped-def]
    lp = listener_factory(PREREAD_ALLOWED_AES="ECHOSCU,GOODSCU")
    with socket.create_connection(("127.0.0.1", lp.port)) as sock:
        sock.sendall(association_request(calling="BADSCU") + echo_request_pdata())
        answer = read_pdu(sock)
        assert answer is not None and answer[0] == 0x03  # A-ASSOCIATE-RJ
        assert answer[1][1:] == bytes([0x01, 0x01, 0x03])  # permanent, service user, calling AE not recognised
        assert closed_by_peer(sock)
    assert echo(lp.port, calling="GOODSCU")
    log = lp.log()
    assert "Traceback" not in log and "InvalidEventError" not in log


def test_empty_affected_sop_instance_uid_gets_a_failure_status(listener_factory) -> None:  # type: ignore[no-untyped-def]
    from pynetdicom.dimse_primitives import C_STORE

    lp = listener_factory()
    ae = _ae()
    assoc = ae.associate("127.0.0.1", lp.port, ae_title="PREREAD")
    try:
        body = dataset_body(dcmread(testdata("CT_small.dcm")))
        context = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage)
        request = C_STORE()
        request.MessageID = 7
        request.AffectedSOPClassUID = CTImageStorage
        request.AffectedSOPInstanceUID = ""  # sent without a value
        request.Priority = 2
        request.DataSet = BytesIO(body)
        # Pause the association's reactor as pynetdicom's own send_c_echo does, or it may take the
        # response off the queue first (pynetdicom 3.0.4's Association._reactor_checkpoint).
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        try:
            assoc.dimse.send_msg(request, context.context_id)
            _, response = assoc.dimse.get_msg(block=True)  # dimse_timeout: 30 s
        finally:
            assoc._reactor_checkpoint.set()
        assert response is not None, "no answer to a C-STORE without an Affected SOP Instance UID"
        assert response.MessageIDBeingRespondedTo == 7
        assert response.Status == 0xC222
    finally:
        assoc.release()
    assert lp.stored_files() == []


#: A listener whose disk "fills up" when a flag file appears (the free-space check reads the flag).
_FILLING_LISTENER = """
import sys
from pathlib import Path
from preread.ingest.listener.ae import Listener
from preread.ingest.storage import space
from preread.schemas.settings import Settings

tmp = Path(sys.argv[1])
real = space.has_free_space
space.has_free_space = lambda *args, **kwargs: not (tmp / "full").exists() and real(*args, **kwargs)
settings = Settings(data_dir=tmp / "data", host="127.0.0.1", port=0, min_free_bytes=16 * 2**20,
                    database_url=f"sqlite:///{tmp / 'preread.db'}")
listener = Listener(settings, monitor=False)
listener.start()
print(listener.address[1], flush=True)
sys.stdin.read()
listener.stop()
"""


def test_disk_filling_up_during_an_association_refuses_at_the_first_fragment(tmp_path: Path, raw_send) -> None:  # type: ignore[no-untyped-def]
    """An association opened while there was room, then the disk fills: the next instance gets 0xA700 and
    its data set is dropped as it arrives, never gathered in the listener's memory."""
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _FILLING_LISTENER, str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.PatientID, ds.Modality = "FULL", "CT"
        path = _write_part10(tmp_path / "big.dcm", ds)
        size = 300 * MiB
        with path.open("r+b") as fp:  # 300 MiB of Pixel Data (a sparse file)
            fp.seek(0, 2)
            fp.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, size))
            fp.truncate(fp.tell() + size)
        assoc = _ae().associate("127.0.0.1", port, ae_title="PREREAD")
        assert assoc.is_established
        try:
            (tmp_path / "full").touch()  # the disk is now below the watermark
            reset_rss_peak(proc.pid)
            before = rss_now(proc.pid)
            assert assoc.send_c_store(path).Status == 0xA700
            growth = rss_peak_since_reset(proc.pid) - before
        finally:
            assoc.release()
    finally:
        proc.communicate("", timeout=60)
    assert growth < 100 * MiB, f"RSS grew by {growth / MiB:.0f} MiB while refusing a {size / MiB:.0f} MiB instance"
    assert not list((tmp_path / "data" / "studies").rglob("*.dcm"))
