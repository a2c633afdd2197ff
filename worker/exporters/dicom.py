"""The SR to a PACS: C-STORE SCU with pynetdicom, optionally Storage Commitment (N-ACTION).

One association per destination is opened on the first send and reused for every report
sent in the same pass, then released (:meth:`DicomExporter.close`). A rejected or aborted
association, or a C-STORE failure status, is a delivery error (retried with backoff); a
status saying the content itself is refused (SOP class not supported, data set does not
match) is permanent. With ``storage_commitment = true`` an N-ACTION asks the PACS to commit
the SR; the answer (N-EVENT-REPORT) arrives at our listener and confirms the delivery.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pydicom.uid import BasicTextSRStorage, Comprehensive3DSRStorage
from pynetdicom import sop_class
from pynetdicom.status import STATUS_FAILURE, STATUS_SUCCESS, STATUS_WARNING, code_to_category

from preread.schemas.settings import Settings
from preread.worker.exporters.base import DeliveryError, PermanentDeliveryError, SendResult, register
from preread.worker.exporters.context import ExportContext
from preread.worker.exporters.sr import build_sr

log = logging.getLogger(__name__)

#: Storage Commitment Push Model SOP Class (pynetdicom builds its SOP class names at import, so mypy cannot see them).
STORAGE_COMMITMENT_PUSH_MODEL: str = sop_class.StorageCommitmentPushModel  # type: ignore[attr-defined]
#: Storage Commitment Push Model: N-ACTION Action Type ID "Request Storage Commitment" (PS3.4 J.3.2).
REQUEST_STORAGE_COMMITMENT = 1
#: The well-known SOP Instance UID of the Storage Commitment Push Model (PS3.4 J.3.5).
STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE = "1.2.840.10008.1.20.1.1"
#: C-STORE failure statuses that mean "this content, never": SOP class not supported, data set mismatch (PS3.4 B.2.3).
_CONTENT_REFUSED_PREFIXES = (0xA9, 0x01)


def client_context(tls: Any) -> ssl.SSLContext | None:
    """A client TLS context from a destination's ``tls`` table (CA to check the PACS, our cert for mutual TLS)."""
    if tls is None:
        return None
    context = ssl.create_default_context(cafile=str(tls.ca) if tls.ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # PACS certificates name AEs, rarely hosts
    if tls.ca is None:
        context.verify_mode = ssl.CERT_NONE
    if tls.cert is not None:
        context.load_cert_chain(str(tls.cert), str(tls.key) if tls.key else None)
    return context


@register("dicom")
class DicomExporter:
    """C-STORE of the report's SR to one DICOM destination."""

    #: Associations opened by every exporter of this process (``bench/export.py`` reports it).
    total_associations = 0

    def __init__(self, destination: Any) -> None:
        self.destination = destination
        self._assoc: Association | None = None
        self.associations_opened = 0
        #: The Storage Commitment Transaction UID of the next send, recorded on the delivery row first.
        self.transaction_uid: str | None = None

    def _associate(self, settings: Settings) -> Association:
        if self._assoc is not None and self._assoc.is_established:
            return self._assoc
        dest = self.destination
        ae = AE(ae_title=dest.calling_ae_title or settings.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout
        for sop_class in (Comprehensive3DSRStorage, BasicTextSRStorage):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        if dest.storage_commitment:
            ae.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL)
        context = client_context(dest.tls)
        kwargs: dict[str, Any] = {"ae_title": dest.ae_title}
        if context is not None:
            kwargs["tls_args"] = (context, None)
        assoc = ae.associate(dest.host, dest.port, **kwargs)
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
            raise DeliveryError(f"DICOM destination {dest.name!r} ({dest.ae_title}@{dest.host}:{dest.port}): association {why}")
        self.associations_opened += 1
        DicomExporter.total_associations += 1
        self._assoc = assoc
        return assoc

    def store(self, dataset: Dataset, settings: Settings) -> None:
        """C-STORE one data set over the (reused) association."""
        assoc = self._associate(settings)
        try:
            status = assoc.send_c_store(dataset)
        except (RuntimeError, ValueError) as exc:  # no accepted context for the SOP class
            self.close()
            raise PermanentDeliveryError(f"DICOM destination {self.destination.name!r}: {exc}") from None
        if not status or "Status" not in status:
            self.close()
            raise DeliveryError(f"DICOM destination {self.destination.name!r}: no C-STORE response (association lost)")
        code = int(status.Status)
        category = code_to_category(code)
        if category in (STATUS_SUCCESS, STATUS_WARNING):
            return
        message = f"DICOM destination {self.destination.name!r}: C-STORE status 0x{code:04X} ({category})"
        if category == STATUS_FAILURE and (code >> 8) in _CONTENT_REFUSED_PREFIXES:
            raise PermanentDeliveryError(message)
        raise DeliveryError(message)

    def request_commitment(self, dataset: Dataset, settings: Settings) -> str:
        """N-ACTION Request Storage Commitment for one SR; returns its Transaction UID."""
        assoc = self._associate(settings)
        transaction_uid = self.transaction_uid or str(generate_uid())
        self.transaction_uid = None
        request = Dataset()
        request.TransactionUID = transaction_uid
        ref = Dataset()
        ref.ReferencedSOPClassUID = dataset.SOPClassUID
        ref.ReferencedSOPInstanceUID = dataset.SOPInstanceUID
        request.ReferencedSOPSequence = [ref]
        status, _reply = assoc.send_n_action(request, REQUEST_STORAGE_COMMITMENT, STORAGE_COMMITMENT_PUSH_MODEL, STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE)
        if not status or code_to_category(int(status.Status)) not in (STATUS_SUCCESS, STATUS_WARNING):
            raise DeliveryError(f"DICOM destination {self.destination.name!r}: Storage Commitment request refused")
        return transaction_uid

    def prepare(self, ctx: ExportContext, settings: Settings) -> Dataset:
        """Build the SR ahead of sending it (the deliverer overlaps this with the previous C-STORE)."""
        dataset: Dataset = build_sr(ctx, settings)
        return dataset

    def send(self, ctx: ExportContext, settings: Settings) -> SendResult:
        """Build the SR and send it."""
        return self.send_prepared(self.prepare(ctx, settings), settings)

    def send_prepared(self, dataset: Dataset, settings: Settings) -> SendResult:
        """Store a built SR, and ask for commitment where configured."""
        self.store(dataset, settings)
        if self.destination.storage_commitment:
            return SendResult(commitment_uid=self.request_commitment(dataset, settings))
        return SendResult()

    def close(self) -> None:
        """Release the association, if one is open."""
        if self._assoc is not None:
            try:
                if self._assoc.is_established:
                    self._assoc.release()
            finally:
                self._assoc = None
