"""The draft as an HL7 v2.5.1 ORU^R01 (result status P, preliminary) sent over MLLP to a RIS.

Many RIS take results as HL7 v2 but accept no FHIR writes. The message carries the patient
(PID, from the source instance header), the accession (OBR-3 and OBR-18), the study (an OBX
with the Study Instance UID), one OBX per probe (probability, abnormal flag at the probe's
threshold), one per finding and one with the impression. The RIS answers with an ACK: AA/CA
is delivered, AR is a permanent refusal, anything else is retried.
"""

from __future__ import annotations

import socket
from datetime import datetime, timezone
from typing import Any

from preread.schemas.settings import Settings
from preread.worker.exporters.base import DeliveryError, PermanentDeliveryError, SendResult, register
from preread.worker.exporters.context import ExportContext, ExportInputError, source_header

#: MLLP framing (HL7 v2 Minimal Lower Layer Protocol).
START_BLOCK, END_BLOCK, CARRIAGE_RETURN = b"\x0b", b"\x1c", b"\x0d"
SENDING_APPLICATION = "PREREAD"
VERSION = "2.5.1"
PRELIMINARY = "P"
ACK_ACCEPTED = {"AA", "CA"}
ACK_REJECTED = {"AR", "CR"}


def escape(value: object) -> str:
    """HL7 v2 escaping of the delimiters ``| ^ ~ \\ &`` and line breaks inside a field."""
    text = "" if value is None else str(value)
    for raw, esc in (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("~", "\\R\\"), ("&", "\\T\\")):
        text = text.replace(raw, esc)
    return text.replace("\r\n", "\\.br\\").replace("\n", "\\.br\\").replace("\r", "\\.br\\")


def _ts(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y%m%d%H%M%S+0000")


def _segment(*fields: str) -> str:
    return "|".join(fields)


def oru_message(ctx: ExportContext, settings: Settings, destination: Any = None, now: datetime | None = None) -> str:
    """The ORU^R01 of one report, segments separated by carriage returns."""
    now = now or datetime.now(timezone.utc)
    try:
        header = source_header(ctx)
        name = "^".join(escape(part) for part in str(header.get("PatientName", "")).split("^"))
        birth, sex = escape(header.get("PatientBirthDate", "")), escape(header.get("PatientSex", ""))
    except ExportInputError:
        name = birth = sex = ""
    receiving_app = escape(getattr(destination, "receiving_application", "RIS"))
    receiving_facility = escape(getattr(destination, "receiving_facility", ""))
    accession = escape(ctx.accession_number or "")
    control_id = f"PR{ctx.report_id}"
    issued = _ts(ctx.report_created_at)
    segments = [
        _segment("MSH", "^~\\&", SENDING_APPLICATION, "", receiving_app, receiving_facility, _ts(now), "",
                 "ORU^R01^ORU_R01", control_id, "P", VERSION),
        _segment("PID", "1", "", escape(ctx.patient_id or ""), "", name, "", birth, sex),
        _segment("OBR", "1", "", accession, f"{escape(ctx.modality or 'IMG')}^{escape(ctx.study_description or 'Imaging study')}",
                 "", "", issued, "", "", "", "", "", "", "", "", "", "", accession, "", "", "", issued, "", "RAD", PRELIMINARY),
    ]
    obx: list[tuple[str, str, str, str, str]] = [
        ("ST", "113014^Study Instance UID^DCM", ctx.study_instance_uid, "", ""),
    ]
    for probe in ctx.probes:
        code = f"{escape(probe.concept.code)}^{escape(probe.concept.meaning)}^{escape(probe.concept.scheme)}"
        obx.append(("NM", code, f"{probe.score:.6f}", "1^probability^UCUM", "A" if probe.present else "N"))
    for finding in ctx.findings:
        qualifiers = ", ".join(q for q in (finding.anatomy, finding.laterality, finding.severity) if q and q != "none")
        text = f"{finding.text} ({qualifiers})" if qualifiers else finding.text
        obx.append(("TX", "59776-5^Procedure findings^LN", text, "", ""))
    obx.append(("TX", "19005-8^Impression^LN", ctx.impression or ctx.draft_text or "", "", ""))
    for i, (value_type, code, value, units, flag) in enumerate(obx, start=1):
        segments.append(_segment("OBX", str(i), value_type, code, "", escape(value), units, "", flag, "", "", PRELIMINARY))
    return "\r".join(segments) + "\r"


def _read_frame(sock: socket.socket) -> bytes:
    buffer = b""
    while END_BLOCK + CARRIAGE_RETURN not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise DeliveryError("connection closed before the ACK")
        buffer += chunk
    start = buffer.find(START_BLOCK)
    return buffer[start + 1: buffer.find(END_BLOCK + CARRIAGE_RETURN)]


def ack_code(ack: str) -> str:
    """MSA-1 of an ACK (AA, AE, AR, CA, CE, CR), or '' when there is no MSA segment."""
    for segment in ack.replace("\n", "\r").split("\r"):
        fields = segment.split("|")
        if fields[0] == "MSA" and len(fields) > 1:
            return fields[1]
    return ""


@register("hl7")
class Hl7Exporter:
    """One ORU^R01 over MLLP; waits for the RIS's ACK."""

    def __init__(self, destination: Any) -> None:
        self.destination = destination

    def send(self, ctx: ExportContext, settings: Settings) -> SendResult:
        """Send and read the ACK; AA/CA is delivered."""
        dest = self.destination
        message = oru_message(ctx, settings, dest).encode("utf-8")
        try:
            with socket.create_connection((dest.host, dest.port), timeout=dest.timeout) as sock:
                sock.sendall(START_BLOCK + message + END_BLOCK + CARRIAGE_RETURN)
                ack = _read_frame(sock).decode("utf-8", "replace")
        except OSError as exc:
            raise DeliveryError(f"HL7 destination {dest.name!r} unreachable: {type(exc).__name__}") from None
        code = ack_code(ack)
        if code in ACK_ACCEPTED:
            return SendResult()
        if code in ACK_REJECTED:
            raise PermanentDeliveryError(f"HL7 destination {dest.name!r} rejected the ORU (MSA-1 {code})")
        raise DeliveryError(f"HL7 destination {dest.name!r} answered MSA-1 {code or 'missing'}")
