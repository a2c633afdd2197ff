"""``preread listen`` end to end: real dcmtk and pynetdicom peers, real files, Postgres."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from tests.conftest import testdata
from tests.support.listener import (
    clone_series,
    dataset_bytes,
    echo,
    listener_factory,  # noqa: F401  (fixture)
    raw_send,  # noqa: F401  (fixture)
    needs_dcmtk,
    storescu,
    storescu_own_syntax,
    wait_for,
)

#: Real files from pydicom and pydicom-data: modalities, transfer syntaxes, multi-frame.
REAL_FILES = [
    "CT_small.dcm",  # CT, explicit VR little endian
    "MR_small_implicit.dcm",  # MR, implicit VR little endian
    "MR_small_bigendian.dcm",  # MR, explicit VR big endian
    "image_dfl.dcm",  # deflated explicit VR little endian
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
    "JPGExtended.dcm",  # JPEG extended (12 bit)
    "JPEG-LL.dcm",  # JPEG lossless SV1
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "JPEGLSNearLossless_08.dcm",  # JPEG-LS near lossless
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "US1_J2KI.dcm",  # US, JPEG 2000
    "MR_small_RLE.dcm",  # RLE
    "RG1_UNCR.dcm",  # CR/DX radiograph, uncompressed
    "US1_UNCR.dcm",  # US, uncompressed
    "emri_small.dcm",  # MR multi-frame
    "693_J2KR.dcm",  # CT 512x512, JPEG 2000 lossless
    "693_UNCR.dcm",  # CT 512x512, uncompressed
]


def _stored_path(lp, sop_uid: str) -> Path:  # type: ignore[no-untyped-def]
    rows = lp.query("select path, transfer_syntax_uid from instances where sop_instance_uid = :u", u=sop_uid)
    assert len(rows) == 1, f"no row for {sop_uid}"
    return Path(rows[0].path)


def fresh_copies(names: list[str], folder: Path) -> list[Path]:
    """Copies of real files, each with a new SOP Instance UID (some test files share one).

    Study/Series Instance UIDs are added where a test file lacks them.

    Only header elements change; pixel data keeps its transfer syntax and bytes.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        ds = dcmread(testdata(name))
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):  # a few test files lack them
            if keyword not in ds:
                setattr(ds, keyword, generate_uid())
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def same_dataset(received, sent) -> bool:  # type: ignore[no-untyped-def]
    """The same dataset: equal elements and equal pixels.

    dcmtk drops Data Set Trailing Padding when it sends, and may send in
    another uncompressed transfer syntax (big endian arrives as little
    endian), so padding is ignored and pixels compare decoded in that case.
    """
    import numpy as np

    for ds in (received, sent):
        if (0xFFFC, 0xFFFC) in ds:
            del ds[0xFFFC, 0xFFFC]
    pixels_equal = True
    if received.file_meta.TransferSyntaxUID != sent.file_meta.TransferSyntaxUID:
        pixels_equal = np.array_equal(received.pixel_array, sent.pixel_array)
        for ds in (received, sent):
            del ds.PixelData
    # values, not VRs: dcmtk writes encapsulated Pixel Data as OB where a file said OW
    return pixels_equal and received.keys() == sent.keys() and all(
        received[tag].value == sent[tag].value for tag in sent.keys()
    )


@needs_dcmtk
def test_echo_and_storescu_real_files_kept_as_sent(listener_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lp = listener_factory()
    assert echo(lp.port)
    files = fresh_copies(REAL_FILES, tmp_path / "real")
    for done in storescu_own_syntax(lp.port, files):
        assert done.returncode == 0 and "E:" not in done.stderr, done.stderr[-2000:]

    for source in files:
        sent = dcmread(source)
        path = _stored_path(lp, sent.SOPInstanceUID)
        ts = lp.query("select transfer_syntax_uid from instances where sop_instance_uid = :u", u=sent.SOPInstanceUID)
        assert ts[0][0] == sent.file_meta.TransferSyntaxUID, source.name
        assert path.is_file() and path.is_relative_to(lp.data_dir / "studies")
        received = dcmread(path)
        assert received.file_meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
        assert same_dataset(received, sent), source.name

    assert lp.query("select count(*) from instances")[0][0] == len(files)
    modalities = {m for (m,) in lp.query("select modality from series")}
    assert modalities >= {"CT", "MR", "US", "CR", "OT"}
    assert echo(lp.port)


@needs_dcmtk
def test_compressed_and_uncompressed_keep_transfer_syntax_and_bytes(listener_factory, raw_send, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Sent in their own transfer syntax, stored files hold the very bytes of the dataset sent."""
    lp = listener_factory()
    names = ["SC_rgb_jpeg_dcmtk.dcm", "JPGExtended.dcm", "JPEG-LL.dcm", "MR_small_jpeg_ls_lossless.dcm",
             "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm", "693_J2KR.dcm", "MR_small_bigendian.dcm",
             "MR_small_implicit.dcm", "image_dfl.dcm", "emri_small.dcm"]
    files = fresh_copies(names, tmp_path / "ts")
    ae = AE(ae_title="PYNETDICOM")
    contexts = {(str(dcmread(f, stop_before_pixels=True).SOPClassUID),
                 str(dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)) for f in files}
    for sop_class, ts in sorted(contexts):
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", lp.port, ae_title="PREREAD")
    assert assoc.is_established
    try:
        for source in files:  # a path: pynetdicom sends the file's encoded dataset without decoding it
            assert assoc.send_c_store(source).Status == 0x0000, source.name
    finally:
        assoc.release()
    for source in files:
        sent = dcmread(source, stop_before_pixels=True)
        rows = lp.query("select path, transfer_syntax_uid from instances where sop_instance_uid = :u",
                        u=sent.SOPInstanceUID)
        assert rows[0].transfer_syntax_uid == sent.file_meta.TransferSyntaxUID, source.name
        assert dataset_bytes(Path(rows[0].path)) == dataset_bytes(source), source.name


def test_pynetdicom_store_duplicate_keeps_one_copy(listener_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lp = listener_factory()
    ds = dcmread(testdata("CT_small.dcm"))
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", lp.port, ae_title="PREREAD")
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(ds).Status == 0x0000
        first = _stored_path(lp, ds.SOPInstanceUID)
        mtime = first.stat().st_mtime_ns
        assert assoc.send_c_store(ds).Status == 0x0000  # duplicate: success, one copy
    finally:
        assoc.release()
    assert lp.query("select count(*) from instances")[0][0] == 1
    assert len(lp.stored_files()) == 1 and first.stat().st_mtime_ns == mtime
    assert dcmread(first) == ds


@needs_dcmtk
def test_generated_200_slice_series_stable_once_then_reopened(listener_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lp = listener_factory(PREREAD_STABLE_AFTER="2")
    files = clone_series(testdata("CT_small.dcm"), tmp_path / "series", 200)
    study_uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    done = storescu(lp.port, files)
    assert done.returncode == 0, done.stderr[-2000:]
    assert lp.query("select count(*) from instances")[0][0] == 200
    assert len(lp.stored_files()) == 200

    def state() -> str:
        return lp.query("select state from studies where study_instance_uid = :u", u=study_uid)[0][0]

    wait_for(lambda: state() == "STABLE", timeout=30, what="study STABLE")
    outbox = lp.query("select topic, payload from outbox")
    assert len(outbox) == 1 and outbox[0].topic == "render"

    # one more instance for the same study re-opens it; it becomes STABLE again, with a new outbox row
    extra = clone_series(testdata("CT_small.dcm"), tmp_path / "extra", 1, study_uid=study_uid)
    assert storescu(lp.port, extra).returncode == 0
    assert state() == "RECEIVING"
    wait_for(lambda: state() == "STABLE", timeout=30, what="study STABLE again")
    assert lp.query("select count(*) from outbox where topic = 'render'")[0][0] == 2


def test_disk_below_watermark_rejects_new_associations_with_local_limit_exceeded(listener_factory) -> None:  # type: ignore[no-untyped-def]
    """Below the watermark nothing is received at all: a new association is rejected (transient,
    service-provider, local-limit-exceeded) instead of a whole instance being read before 0xA700."""
    lp = listener_factory(start=False, PREREAD_MIN_FREE_BYTES=str(10**18))
    lp.start(wait=False)
    wait_for(lambda: lp.alive() and "listening as" in lp.log(), timeout=60, what="listener up")
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", lp.port, ae_title="PREREAD")
    assert assoc.is_rejected and not assoc.is_established
    rejection = assoc.acceptor.primitive
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (0x02, 0x03, 0x02)
    assert lp.stored_files() == [] and lp.quarantined() == []
    assert lp.query("select count(*) from instances")[0][0] == 0
    assert "free space below watermark" in lp.log()


def test_sigterm_stops_cleanly(listener_factory) -> None:  # type: ignore[no-untyped-def]
    lp = listener_factory()
    assert lp.stop() == 0

