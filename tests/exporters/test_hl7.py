"""HL7 v2: an ORU^R01 over MLLP to a small RIS that acknowledges; the message parses with the ``hl7`` library."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import hl7
from sqlalchemy import select

from preread.schemas.database import session_scope
from preread.schemas.settings import Settings
from preread.schemas.tables import Delivery, DeliveryState
from preread.worker.exporters.deliveries import deliver_due
from tests.support.drafted import FINDINGS, PATIENT, PROBES, drafted_study


class MllpServer:
    """Accepts MLLP frames, records them, answers an ACK with ``self.ack`` in MSA-1."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.ack = "AA"
        self.messages: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\x1c\x0d" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                message = data[data.find(b"\x0b") + 1: data.find(b"\x1c")].decode()
                self.messages.append(message)
                control = hl7.parse(message).segment("MSH")[10][0]
                reply = f"MSH|^~\\&|RIS||PREREAD||20261130000000||ACK^R01^ACK|A{control}|P|2.5.1\rMSA|{self.ack}|{control}\r"
                conn.sendall(b"\x0b" + reply.encode() + b"\x1c\x0d")


def test_oru_to_ris_over_mllp(pg_url: str, tmp_path: Path) -> None:
    _, study_uid = drafted_study(pg_url, tmp_path / "src")
    ris = MllpServer()
    settings = Settings(database_url=pg_url, data_dir=tmp_path / "data",
                        destinations=[{"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": ris.port}])
    deliver_due(settings, wait=True)
    [raw] = ris.messages
    message = hl7.parse(raw)
    assert str(message.segment("MSH")[9]) == "ORU^R01^ORU_R01"
    pid = message.segment("PID")
    assert str(pid[3]) == PATIENT[1] and str(pid[5]) == PATIENT[0], "the RIS files it under the patient"
    obr = message.segment("OBR")
    assert str(obr[3]) == "ACC00000" and str(obr[25]) == "P", "the accession, result status preliminary"
    obx = {str(seg[3][0][1]): seg for seg in message.segments("OBX")}
    assert str(obx["Study Instance UID"][5]) == study_uid
    assert str(obx["Impression"][5]) == "Left pneumothorax."
    assert float(str(obx["Pneumothorax"][5])) == PROBES["pneumothorax"] and str(obx["Pneumothorax"][8]) == "A"
    assert float(str(obx["Pleural effusion"][5])) == PROBES["pleural_effusion"] and str(obx["Pleural effusion"][8]) == "N"
    findings = [str(seg[5]) for seg in message.segments("OBX") if str(seg[3][0][1]) == "Procedure findings"]
    assert [f.split(" (")[0] for f in findings] == [f[0] for f in FINDINGS]
    assert {str(seg[11]) for seg in message.segments("OBX")} == {"P"}
    with session_scope(pg_url) as session:
        assert session.scalars(select(Delivery.state)).all() == [DeliveryState.DELIVERED]

    ris.ack = "AR"
    drafted_study(pg_url, tmp_path / "src", n=1)
    deliver_due(settings, wait=True)
    with session_scope(pg_url) as session:
        rows = session.scalars(select(Delivery).order_by(Delivery.id)).all()
        assert rows[1].state == DeliveryState.FAILED and "MSA-1 AR" in (rows[1].last_error or "")
