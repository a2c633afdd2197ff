"""Who gets in: the calling-AE allowlist, TLS (with client certificates), and ``--workers``."""

from __future__ import annotations

import re
import ssl
import threading
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from preread.ingest.listener.access import is_allowed, parse_allowlist
from tests.conftest import testdata
from tests.support.pki import make_pki
from tests.support.listener import (
    clone_series,
    echo,
    listener_factory,  # noqa: F401  (fixture)
    needs_dcmtk,
    storescu,
    wait_for,
)


def _ae(title: str = "PYNETDICOM") -> AE:
    ae = AE(ae_title=title)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 15
    return ae


def test_allowlist_parsing() -> None:
    peers = parse_allowlist(" MODALITY1 , PACS@10.0.0.5, WS@192.168.0.0/24 ,")
    assert [p.ae_title for p in peers] == ["MODALITY1", "PACS", "WS"]
    assert is_allowed(peers, "MODALITY1", "1.2.3.4")
    assert is_allowed(peers, "PACS", "10.0.0.5") and not is_allowed(peers, "PACS", "10.0.0.6")
    assert is_allowed(peers, "WS", "192.168.0.77") and not is_allowed(peers, "WS", "192.168.1.1")
    assert not is_allowed(peers, "OTHER", "10.0.0.5")
    assert is_allowed(parse_allowlist(None), "ANYONE", "1.1.1.1")
    with pytest.raises(ValueError):
        parse_allowlist("THIS_TITLE_IS_TOO_LONG")


@needs_dcmtk
def test_unknown_calling_ae_rejected_at_association(listener_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lp = listener_factory(start=False, PREREAD_ALLOWED_AES="ECHOSCU,GOODSCU,PINNED@10.99.0.0/16")
    lp.start()  # waits with echoscu's default calling AE, ECHOSCU, which is allowed
    assert echo(lp.port, calling="GOODSCU")
    assert not echo(lp.port, calling="BADSCU")
    assert not echo(lp.port, calling="PINNED")  # right title, wrong source address

    assoc = _ae("INTRUDER").associate("127.0.0.1", lp.port, ae_title="PREREAD")
    assert assoc.is_rejected and not assoc.is_established
    assert (assoc.acceptor.primitive.result, assoc.acceptor.primitive.diagnostic) == (0x01, 0x03)

    files = clone_series(testdata("CT_small.dcm"), tmp_path / "s", 2)
    assert storescu(lp.port, files, calling="GOODSCU").returncode == 0
    bad = storescu(lp.port, files, calling="BADSCU")
    assert bad.returncode != 0
    assert lp.query("select count(*) from instances")[0][0] == 2
    assert "rejected: calling AE not allowed (calling AE BADSCU," in lp.log()


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    return make_pki(tmp_path / "pki")


def _client_context(pki: Path, with_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    if with_cert:
        ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    return ctx


def test_tls_association_works_and_plain_one_fails(listener_factory, pki: Path) -> None:  # type: ignore[no-untyped-def]
    lp = listener_factory(
        start=False,
        PREREAD_TLS_CERT=str(pki / "server.pem"),
        PREREAD_TLS_KEY=str(pki / "server.key"),
        PREREAD_TLS_CA=str(pki / "ca.pem"),
    )
    lp.start(wait=False)
    ae = _ae()

    def tls_echo() -> bool:
        lp.alive()
        assoc = ae.associate("127.0.0.1", lp.port, ae_title="PREREAD", tls_args=(_client_context(pki), "127.0.0.1"))
        if not assoc.is_established:
            return False
        ok = assoc.send_c_echo().Status == 0x0000
        assoc.release()
        return ok

    wait_for(tls_echo, timeout=60, interval=0.3, what="TLS C-ECHO")

    ds = dcmread(testdata("CT_small.dcm"))
    assoc = ae.associate("127.0.0.1", lp.port, ae_title="PREREAD", tls_args=(_client_context(pki), "127.0.0.1"))
    assert assoc.is_established
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    assert lp.query("select count(*) from instances")[0][0] == 1

    # a plain association to the TLS port fails, and so does TLS without a client certificate
    plain = ae.associate("127.0.0.1", lp.port, ae_title="PREREAD")
    assert not plain.is_established
    no_cert = ae.associate("127.0.0.1", lp.port, ae_title="PREREAD",
                           tls_args=(_client_context(pki, with_cert=False), "127.0.0.1"))
    assert not no_cert.is_established
    assert not echo(lp.port)  # dcmtk without TLS
    assert tls_echo()  # and the listener still serves
    assert re.search(r"connection from 127\.0\.0\.1:\d+ closed: TLS handshake failed", lp.log())  # who, and what


@needs_dcmtk
@pytest.mark.slow
@pytest.mark.parametrize("database", ["postgres", "sqlite"])
def test_workers_share_the_port_and_stop_on_sigterm(listener_factory, tmp_path: Path, database: str) -> None:  # type: ignore[no-untyped-def]
    lp = listener_factory(args=["--workers", "2"], sqlite=database == "sqlite")
    wait_for(lambda: len(set(re.findall(r"\[(\d+)\] preread.ingest.listener: listening", lp.log()))) == 2,
             timeout=60, what="two worker processes listening")
    files = clone_series(testdata("CT_small.dcm"), tmp_path / "s", 120)
    results: list[int] = []

    def send(group: list[Path]) -> None:
        results.append(storescu(lp.port, group).returncode)

    threads = [threading.Thread(target=send, args=(files[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [0, 0, 0, 0]
    # both workers took associations: the busy one let the idle one accept (with SO_REUSEPORT hashing all four
    # landed on one worker one time in eight)
    accepted = re.findall(r"\[(\d+)\] preread.ingest.listener: association accepted: calling AE STORESCU", lp.log())
    assert len(accepted) == 4 and len(Counter(accepted)) == 2, accepted
    assert lp.query("select count(*) from instances")[0][0] == 120
    assert len(lp.stored_files()) == 120
    assert lp.stop() == 0
    assert not echo(lp.port, timeout=2)
