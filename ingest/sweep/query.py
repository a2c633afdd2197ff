"""Finding a source's studies one day at a time, and counting their instances.

DICOM: C-FIND at STUDY level per day; a day that answers with as many results
as the source's ``max_results`` (or with a status saying a limit was hit) is
asked again hour by hour. The STUDY-level query asks for each study's
Number of Study Related Instances: where the source returns it, that is the
study's count, taken with the day's one query; where it does not, the study's
instances are counted at IMAGE level, series by series (a hierarchical query
every PACS answers), before its retrieve. DICOMweb: the same through QIDO-RS.
Folder: the tree is read once (``ingest.assembly.discover``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Protocol

import requests
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from preread.ingest.assembly.discover import FoundStudy, discover
from preread.ingest.listener.transport import park_reactor
from preread.ingest.sweep.dimse import LIMIT_STATUSES, QRStatus, associate
from preread.ingest.sweep.sources import DicomSource, DicomWebSource, FolderSource

log = logging.getLogger(__name__)

#: Seconds an HTTP request to a DICOMweb source may take.
HTTP_TIMEOUT = 120.0


@dataclass(frozen=True, slots=True)
class RemoteStudy:
    """A study as the source lists it (no patient data kept)."""

    study_uid: str
    study_date: date | None
    modalities: str
    #: Number of Study Related Instances as the source gave it; None when it did not (counted at IMAGE level then).
    instances: int | None = None


class QueryLimitHit(RuntimeError):
    """Even one hour holds more studies than the source returns at once."""


class Query(Protocol):
    """What the runner asks of every kind of source."""

    def find_studies(self, day: date, modalities: list[str]) -> list[RemoteStudy]: ...

    def count_instances(self, study_uid: str, assoc: Any = None) -> list[str]: ...


def _date(text: object) -> date | None:
    value = str(text or "").strip()[:8]
    try:
        return date(int(value[:4]), int(value[4:6]), int(value[6:8]))
    except ValueError:
        return None


def _instances(value: object) -> int | None:
    """A Number of Study Related Instances as given (IS, JSON number, a list of one); None if absent or not positive."""
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) == 1 else None
    try:
        count = int(str(value).strip())
    except ValueError:
        return None
    return count if count > 0 else None


def _wanted(found_modalities: str, modalities: list[str]) -> bool:
    """Whether a study's modalities meet the filter (a source that did not say is kept)."""
    if not modalities or not found_modalities:
        return True
    return bool(set(found_modalities.split(",")) & set(modalities))


def hour_spans() -> Iterator[str]:
    """StudyTime ranges covering a day hour by hour."""
    for hour in range(24):
        yield f"{hour:02d}0000-{hour:02d}5959.999999"


class DicomQuery:
    """C-FIND against a PACS."""

    def __init__(self, source: DicomSource, calling_ae: str) -> None:
        self.source = source
        self.calling_ae = calling_ae

    def _associate(self):  # type: ignore[no-untyped-def]
        return associate(self.source, self.calling_ae, [(StudyRootQueryRetrieveInformationModelFind, None)])

    def _find(self, identifier: Dataset, assoc: Association | None = None) -> tuple[list[Dataset], int]:
        """Every matching identifier and the final status (on ``assoc``, or a new association)."""
        if assoc is None:
            with self._associate() as new:
                return self._find(identifier, new)
        found: list[Dataset] = []
        final = QRStatus.SUCCESS.value
        park_reactor(assoc)
        for status, ident in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
            if status is None or "Status" not in status:
                raise RuntimeError(f"source {self.source.name!r}: C-FIND got no response (timeout or abort)")
            code = int(status.Status)
            if code in (QRStatus.PENDING, QRStatus.PENDING_WARNING):
                if ident is not None:
                    found.append(ident)
            else:
                final = code
        return found, final

    def _studies(self, day: date, modalities: list[str], time_span: str | None) -> tuple[list[RemoteStudy], bool]:
        ident = Dataset()
        ident.QueryRetrieveLevel = "STUDY"
        ident.StudyInstanceUID = ""
        ident.StudyDate = day.strftime("%Y%m%d")
        ident.StudyTime = time_span or ""
        ident.ModalitiesInStudy = "\\".join(modalities) if modalities else ""
        ident.NumberOfStudyRelatedInstances = ""
        found, final = self._find(ident)
        limit = self.source.max_results
        hit = final in LIMIT_STATUSES or (limit is not None and len(found) >= limit)
        if final not in (QRStatus.SUCCESS, *LIMIT_STATUSES):
            raise RuntimeError(f"source {self.source.name!r}: C-FIND for {day} ended with status 0x{final:04X}")
        studies = []
        for ds in found:
            uid = str(ds.get("StudyInstanceUID", "") or "").strip()
            mods = ds.get("ModalitiesInStudy", "")
            mods_text = ",".join(str(m) for m in ([mods] if isinstance(mods, str) else list(mods or [])) if m)
            if uid and _wanted(mods_text, modalities):
                studies.append(RemoteStudy(uid, _date(ds.get("StudyDate")) or day, mods_text,
                                           _instances(ds.get("NumberOfStudyRelatedInstances"))))
        return studies, hit

    def find_studies(self, day: date, modalities: list[str]) -> list[RemoteStudy]:
        """The studies of ``day`` (hour by hour when the day hits the result limit)."""
        studies, hit = self._studies(day, modalities, None)
        if not hit:
            return studies
        log.info("source %s: %s hit the result limit; querying hour by hour", self.source.name, day)
        by_uid: dict[str, RemoteStudy] = {}
        for span in hour_spans():
            part, hit = self._studies(day, modalities, span)
            if hit:
                raise QueryLimitHit(
                    f"source {self.source.name!r}: more than {self.source.max_results or 'its limit of'} studies in one "
                    f"hour of {day}; raise the PACS's result limit (and max_results in [[sources]])"
                )
            by_uid.update((s.study_uid, s) for s in part)
        return list(by_uid.values())

    def count_instances(self, study_uid: str, assoc: Association | None = None) -> list[str]:
        """The SOP Instance UIDs of a study, series by series at IMAGE level, on one association.

        ``assoc``: an open association with the Find context (the retrieve's, see ``DicomRetrieve.association``).
        """
        if assoc is None:
            with self._associate() as new:
                return self._count(study_uid, new)
        return self._count(study_uid, assoc)

    def _count(self, study_uid: str, assoc: Association) -> list[str]:
        series = Dataset()
        series.QueryRetrieveLevel = "SERIES"
        series.StudyInstanceUID = study_uid
        series.SeriesInstanceUID = ""
        found, final = self._find(series, assoc)
        if final != QRStatus.SUCCESS:
            raise RuntimeError(f"source {self.source.name!r}: series C-FIND ended with status 0x{final:04X}")
        uids: list[str] = []
        for ds in found:
            image = Dataset()
            image.QueryRetrieveLevel = "IMAGE"
            image.StudyInstanceUID = study_uid
            image.SeriesInstanceUID = str(ds.get("SeriesInstanceUID", ""))
            image.SOPInstanceUID = ""
            instances, final = self._find(image, assoc)
            if final != QRStatus.SUCCESS:
                raise RuntimeError(f"source {self.source.name!r}: image C-FIND ended with status 0x{final:04X}")
            uids.extend(str(i.get("SOPInstanceUID", "")) for i in instances)
        return sorted(set(u for u in uids if u))


def http_session(source: DicomWebSource) -> requests.Session:
    """A requests session with the source's token and TLS settings."""
    session = requests.Session()
    if source.token:
        session.headers["Authorization"] = f"Bearer {source.token}"
    if source.tls is not None:
        if source.tls.ca is not None:
            session.verify = str(source.tls.ca)
        if source.tls.cert is not None:
            session.cert = (str(source.tls.cert), str(source.tls.key)) if source.tls.key else str(source.tls.cert)
    adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=source.max_associations)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _tag(item: dict[str, Any], tag: str) -> list[Any]:
    return list((item.get(tag) or {}).get("Value") or [])


class WebQuery:
    """QIDO-RS against a DICOMweb server."""

    def __init__(self, source: DicomWebSource, session: requests.Session | None = None) -> None:
        self.source = source
        self.session = session or http_session(source)

    def _get(self, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        url = f"{self.source.url}{path}"
        try:
            response = self.session.get(url, params=params, headers={"Accept": "application/dicom+json"},
                                        timeout=HTTP_TIMEOUT)
        except requests.RequestException as exc:
            raise RuntimeError(
                f"source {self.source.name!r}: cannot reach {self.source.url} ({type(exc).__name__}); check url in [[sources]]"
            ) from None
        if response.status_code in (401, 403):
            raise RuntimeError(f"source {self.source.name!r}: {self.source.url} refused us (HTTP {response.status_code}); check token in [[sources]]")
        if response.status_code == 204:
            return []
        response.raise_for_status()
        return list(response.json() or [])

    def _studies(self, day: date, modalities: list[str], span: str | None) -> tuple[list[RemoteStudy], bool]:
        params = {"StudyDate": day.strftime("%Y%m%d"), "includefield": "00080061,00201208"}
        if span:
            params["StudyTime"] = span
        if modalities:
            params["ModalitiesInStudy"] = ",".join(modalities)
        if self.source.max_results:
            params["limit"] = str(self.source.max_results)
        items = self._get("/studies", params)
        hit = self.source.max_results is not None and len(items) >= self.source.max_results
        studies = []
        for item in items:
            uid = next(iter(_tag(item, "0020000D")), "")
            mods = ",".join(str(m) for m in _tag(item, "00080061"))
            if uid and _wanted(mods, modalities):
                studies.append(RemoteStudy(str(uid), _date(next(iter(_tag(item, "00080020")), "")) or day, mods,
                                           _instances(next(iter(_tag(item, "00201208")), None))))
        return studies, hit

    def find_studies(self, day: date, modalities: list[str]) -> list[RemoteStudy]:
        """The studies of ``day`` (hour by hour when the day hits ``max_results``)."""
        studies, hit = self._studies(day, modalities, None)
        if not hit:
            return studies
        by_uid: dict[str, RemoteStudy] = {}
        for span in hour_spans():
            part, hit = self._studies(day, modalities, span.split(".")[0])
            if hit:
                raise QueryLimitHit(f"source {self.source.name!r}: more than max_results studies in one hour of {day}")
            by_uid.update((s.study_uid, s) for s in part)
        return list(by_uid.values())

    def count_instances(self, study_uid: str, assoc: Any = None) -> list[str]:
        """The SOP Instance UIDs of a study (QIDO-RS instance level)."""
        items = self._get(f"/studies/{study_uid}/instances", {"includefield": "00080018"})
        return sorted({str(next(iter(_tag(i, "00080018")), "")) for i in items} - {""})


class FolderQuery:
    """A folder of DICOM files: read once, then answered from memory."""

    def __init__(self, source: FolderSource) -> None:
        self.source = source
        self._studies: dict[str, FoundStudy] | None = None

    def studies(self) -> dict[str, FoundStudy]:
        """Every study under the folder, by Study Instance UID."""
        if self._studies is None:
            if not self.source.path.is_dir():
                raise RuntimeError(f"source {self.source.name!r}: {self.source.path} is not a folder; check path in [[sources]]")
            found, skipped = discover([self.source.path])
            if skipped:
                log.info("source %s: %d files skipped (not readable DICOM)", self.source.name, len(skipped))
            self._studies = {s.study_uid: s for s in found}
        return self._studies

    def find_studies(self, day: date, modalities: list[str]) -> list[RemoteStudy]:
        """The folder's studies dated ``day``."""
        result = []
        for study in self.studies().values():
            header = study.instances[0].header
            mods = ",".join(sorted({str(i.header.get("Modality", "") or "") for i in study.instances} - {""}))
            if _date(header.get("StudyDate")) == day and _wanted(mods, modalities):
                result.append(RemoteStudy(study.study_uid, day, mods, len({i.identity.sop_instance_uid for i in study.instances})))
        return result

    def count_instances(self, study_uid: str, assoc: Any = None) -> list[str]:
        """The SOP Instance UIDs of the study's files."""
        study = self.studies().get(study_uid)
        return sorted(i.identity.sop_instance_uid for i in study.instances) if study else []

    def files(self, study_uid: str) -> list[Path]:
        """The files of a study."""
        study = self.studies().get(study_uid)
        return [i.path for i in study.instances] if study else []


def modality_list(text: str | Iterable[str] | None) -> list[str]:
    """``'cr, DX'`` as ``['CR', 'DX']``."""
    if text is None:
        return []
    parts = text.split(",") if isinstance(text, str) else list(text)
    return [p.strip().upper() for p in parts if p.strip()]
