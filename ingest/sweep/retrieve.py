"""Bringing studies here: C-MOVE to our listener, C-GET, WADO-RS, or copying a folder's files.

Every way ends with the instances in the listener's storage and index; the
runner then counts what arrived (:func:`ledger.received_count`) rather than
trusting the peer's sub-operation counts. A DICOM source is asked for up to
``move_batch`` studies in one request (a list of Study Instance UIDs), so the
PACS opens one association to our listener for them instead of one per study.
"""

from __future__ import annotations

import logging
import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, Protocol

import requests
from pydicom.dataset import Dataset
from pynetdicom import AllStoragePresentationContexts, build_role, evt
from pynetdicom.status import STATUS_FAILURE, code_to_category
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from preread.ingest.listener.transport import park_reactor
from preread.ingest.listener.ae import TRANSFER_SYNTAXES
from preread.ingest.listener.handlers import IngestContext, handle_store
from preread.ingest.sweep.dimse import QRStatus, SourceUnavailable, associate, slots, where
from preread.ingest.sweep.query import HTTP_TIMEOUT, FolderQuery, http_session
from preread.ingest.sweep.sources import DicomSource, DicomWebSource, FolderSource, Retrieve
from preread.ingest.sweep.store import store_part10

log = logging.getLogger(__name__)

#: Most storage SOP classes offered on a C-GET association (128 contexts at most, one is the Get model).
GET_STORAGE_CONTEXTS = 127


@dataclass(frozen=True, slots=True)
class Retrieved:
    """What the peer said of a retrieve: sub-operations completed, failed, warned; final status."""

    completed: int = 0
    failed: int = 0
    warning: int = 0
    status: int = QRStatus.SUCCESS

    def __add__(self, other: Retrieved) -> Retrieved:
        worst = other.status if code_to_category(other.status) == STATUS_FAILURE else self.status
        return Retrieved(self.completed + other.completed, self.failed + other.failed, self.warning + other.warning,
                         worst)


class Retriever(Protocol):
    """Brings studies' instances into the listener's storage and index, up to ``batch`` studies a request."""

    #: Studies one :meth:`retrieve` call may take.
    batch: int

    def retrieve(self, study_uids: Sequence[str], assoc: Any = None) -> Retrieved: ...

    def association(self) -> AbstractContextManager[Any]: ...


def _subops(status: Dataset) -> tuple[int, int, int]:
    return (
        int(status.get("NumberOfCompletedSuboperations", 0) or 0),
        int(status.get("NumberOfFailedSuboperations", 0) or 0),
        int(status.get("NumberOfWarningSuboperations", 0) or 0),
    )


def _identifier(study_uids: Sequence[str]) -> Dataset:
    """A STUDY-level retrieve identifier; several UIDs make a list in the unique key."""
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = list(study_uids) if len(study_uids) > 1 else study_uids[0]
    return ident


class DicomRetrieve:
    """C-MOVE to ``move_destination`` (default this listener's AE title), or C-GET into our storage."""

    def __init__(self, source: DicomSource, calling_ae: str, our_ae: str, ctx: IngestContext | None) -> None:
        self.source = source
        self.calling_ae = calling_ae
        self.destination = source.move_destination or our_ae
        self.ctx = ctx
        #: C-MOVEs refused with nothing moved before any study moved (a PACS that does not know our AE title)
        self.refusals = 0
        self.moved_any = False
        #: studies per request; drops to 1 when the PACS turns out to refuse a list of UIDs
        self.batch = source.move_batch

    def association(self) -> AbstractContextManager[Association]:
        """One association for a study's count and its retrieve: Find, and Move or Get with storage roles."""
        contexts: list[tuple[str, list[str] | None]] = [(StudyRootQueryRetrieveInformationModelFind, None)]
        if self.source.retrieve != Retrieve.C_GET:
            return associate(self.source, self.calling_ae, contexts + [(StudyRootQueryRetrieveInformationModelMove, None)])
        if self.ctx is None:
            raise RuntimeError("C-GET needs an ingest context")
        storage = AllStoragePresentationContexts[:GET_STORAGE_CONTEXTS - 1]
        contexts += [(StudyRootQueryRetrieveInformationModelGet, None)]
        contexts += [(str(c.abstract_syntax), TRANSFER_SYNTAXES) for c in storage]
        roles = [build_role(str(c.abstract_syntax), scp_role=True) for c in storage]
        return associate(self.source, self.calling_ae, contexts, roles=roles,
                         handlers=[(evt.EVT_C_STORE, handle_store, [self.ctx])])

    def retrieve(self, study_uids: Sequence[str], assoc: Association | None = None) -> Retrieved:
        """Run the C-MOVE or C-GET of these studies to its final status (on ``assoc`` from :meth:`association`).

        Several studies go in one request. If that request fails with nothing
        moved, each study is asked for on its own; when every one of those
        then moves, the PACS does not take lists, and this source is asked one
        study per request from then on.
        """
        if assoc is None:
            with self.association() as new:
                return self.retrieve(study_uids, new)
        park_reactor(assoc)
        uids = list(study_uids)
        what = "C-GET" if self.source.retrieve == Retrieve.C_GET else "C-MOVE"
        if len(uids) == 1:
            return self._final(self._send(uids, assoc), what)
        listed = self._final(self._send(uids, assoc), what, judge=False)
        if listed.completed or code_to_category(listed.status) != STATUS_FAILURE:
            return listed
        singles = Retrieved()
        moved = 0
        for uid in uids:
            try:
                one = self._final(self._send([uid], assoc), what)
            except SourceUnavailable:
                raise
            except RuntimeError as exc:  # this study is counted short by the runner's check and retried
                log.info("source %s: %s of one study failed: %s", self.source.name, what, exc)
                continue
            moved += bool(one.completed)
            singles += one
        if moved == len(uids):
            self.batch = 1
            log.warning(
                "source %s: a %s of %d studies in one request failed (status 0x%04X) and each alone moved: asking "
                "one study per request from now on (move_batch = 1 in [[sources]] skips the first try)",
                self.source.name, what, len(uids), listed.status,
            )
        return singles

    def _send(self, uids: list[str], assoc: Association) -> Any:
        if self.source.retrieve == Retrieve.C_GET:
            return assoc.send_c_get(_identifier(uids), StudyRootQueryRetrieveInformationModelGet)
        return assoc.send_c_move(_identifier(uids), self.destination, StudyRootQueryRetrieveInformationModelMove)

    def _final(self, responses: Any, what: str, judge: bool = True) -> Retrieved:
        """The last response's sub-operation counts; ``judge``: a failure with nothing moved raises (two such
        before anything ever moved are a PACS refusing our AE title as the destination)."""
        result = Retrieved()
        for status, _ident in responses:
            if status is None or "Status" not in status:
                raise RuntimeError(f"source {self.source.name!r}: {what} got no response (timeout or abort)")
            code = int(status.Status)
            completed, failed, warning = _subops(status)
            result = Retrieved(completed, failed, warning, code)
            if code == QRStatus.MOVE_DESTINATION_UNKNOWN:
                raise SourceUnavailable(self._destination_hint(code, "does not know"))
        if completed:
            self.moved_any = True
        elif not judge:
            return result
        elif what == "C-MOVE" and code_to_category(result.status) == STATUS_FAILURE and not self.moved_any:
            # Some PACS (Orthanc: 0xC000) answer a general failure for an unknown destination: two such refusals
            # before anything ever moved are taken as that, and stop the sweep with the fix.
            self.refusals += 1
            if self.refusals >= 2:
                raise SourceUnavailable(self._destination_hint(result.status, "refused to move anything to"))
            raise RuntimeError(f"C-MOVE failed with status 0x{result.status:04X}, nothing moved")
        return result

    def _destination_hint(self, code: int, verb: str) -> str:
        return (
            f"source {self.source.name!r}: {where(self.source)} {verb} the move destination {self.destination!r} "
            f"(status 0x{code:04X}); add AE {self.destination!r} with this listener's host and port (PREREAD_PORT) "
            "to the PACS's DICOM peers, or set retrieve = \"c-get\" in [[sources]]"
        )


_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


def multipart_parts(content_type: str, body: bytes) -> list[bytes]:
    """The bodies of a ``multipart/related`` response."""
    match = _BOUNDARY.search(content_type)
    if not match:
        raise ValueError("multipart response without a boundary")
    delimiter = b"--" + match.group(1).encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        parts.append(payload[:-2] if payload.endswith(b"\r\n") else payload)
    return parts


class WebRetrieve:
    """WADO-RS of a whole study, each part stored through the listener's path."""

    batch = 1

    def __init__(self, source: DicomWebSource, ctx: IngestContext) -> None:
        self.source = source
        self.ctx = ctx
        self.session = http_session(source)

    def association(self) -> AbstractContextManager[None]:
        """No association: each request takes one of the source's connection slots."""
        return nullcontext()

    def retrieve(self, study_uids: Sequence[str], assoc: Any = None) -> Retrieved:
        """GET each study as multipart DICOM; store every part."""
        total = Retrieved()
        for uid in study_uids:
            total += self._study(uid)
        return total

    def _study(self, study_uid: str) -> Retrieved:
        with slots(self.source.name, self.source.max_associations):
            try:
                response = self.session.get(
                    f"{self.source.url}/studies/{study_uid}",
                    headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
                    timeout=HTTP_TIMEOUT,
                )
            except requests.RequestException as exc:
                raise RuntimeError(f"source {self.source.name!r}: WADO-RS failed ({type(exc).__name__})") from None
        if response.status_code == 404:
            return Retrieved(status=QRStatus.SUCCESS)
        response.raise_for_status()
        completed = failed = 0
        for part in multipart_parts(response.headers.get("Content-Type", ""), response.content):
            try:
                store_part10(self.ctx, part)
                completed += 1
            except (ValueError, OSError) as exc:
                failed += 1
                log.warning("source %s: a WADO-RS part of study %s not kept: %s", self.source.name, study_uid, exc)
        return Retrieved(completed, failed)


class FolderRetrieve:
    """Copies a folder study's files into the listener's storage and index."""

    batch = 1

    def __init__(self, query: FolderQuery, ctx: IngestContext) -> None:
        self.query = query
        self.ctx = ctx

    def association(self) -> AbstractContextManager[None]:
        """No association for a folder."""
        return nullcontext()

    def retrieve(self, study_uids: Sequence[str], assoc: Any = None) -> Retrieved:
        """Store every file of the studies."""
        completed = failed = 0
        for path in (p for uid in study_uids for p in self.query.files(uid)):
            try:
                store_part10(self.ctx, path.read_bytes())
                completed += 1
            except (ValueError, OSError) as exc:
                failed += 1
                log.warning("folder source: %s not kept: %s", path.name, exc)
        return Retrieved(completed, failed)
