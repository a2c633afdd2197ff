"""Find DICOM files on disk and group them into studies.

Used by ``preread draft`` and folder sweeps. A file that is not DICOM, is
truncated or lacks valid UIDs is reported with its reason, never fatal.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.utils import get_expected_length

from preread.ingest.assembly.catalog import InstanceIdentity, InvalidIdentity, identity_of
from preread.ingest.assembly.reading import read_file


@dataclass(frozen=True, slots=True)
class FoundInstance:
    """A readable DICOM file with its header (no pixel data loaded)."""

    path: Path
    header: Dataset
    identity: InstanceIdentity
    transfer_syntax_uid: str | None
    size_bytes: int


@dataclass(frozen=True, slots=True)
class Skipped:
    """A file that could not be used, and why."""

    path: Path
    reason: str


@dataclass
class FoundStudy:
    """The instances of one Study Instance UID found on disk."""

    study_uid: str
    instances: list[FoundInstance] = field(default_factory=list)


def iter_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Every regular file under ``paths`` (files are yielded as given), sorted for repeatability."""
    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        else:
            yield path


def _truncation_check(ds: Dataset, cut_short: bool) -> None:
    """Raise if the file ends before its pixel data does: pydicom reads a short value silently."""
    if cut_short:
        raise ValueError("truncated: the file ends inside its pixel data")
    if "PixelData" not in ds:
        return
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is not None and tsyntax.is_encapsulated:
        return
    try:
        expected = int(get_expected_length(ds, unit="bytes"))
        actual = len(ds.PixelData)
    except Exception:  # odd Rows/Columns etc.: the renderer gives the reason
        return
    if actual < expected:
        raise ValueError(f"truncated: pixel data has {actual} of {expected} bytes")


def read_instance(path: Path) -> FoundInstance:
    """The header and identity of one file; raises ``ValueError`` with a readable reason."""
    try:
        ds, cut_short = read_file(path)
    except InvalidDicomError:  # its text advises force=True, which a user cannot act on
        raise ValueError("not DICOM (no DICM prefix and no File Meta Information)") from None
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise ValueError(f"unreadable DICOM ({type(exc).__name__}: {exc})") from None
    try:
        ident = identity_of(ds)
    except InvalidIdentity as exc:
        raise ValueError(str(exc)) from None
    _truncation_check(ds, cut_short)
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return FoundInstance(path, ds, ident, str(tsyntax) if tsyntax else None, path.stat().st_size)


def discover(paths: Iterable[Path]) -> tuple[list[FoundStudy], list[Skipped]]:
    """Group the DICOM files under ``paths`` by study; list what was skipped and why."""
    studies: dict[str, FoundStudy] = {}
    skipped: list[Skipped] = []
    seen_sops: set[str] = set()
    for path in iter_files(paths):
        try:
            found = read_instance(path)
        except ValueError as exc:
            skipped.append(Skipped(path, str(exc)))
            continue
        if found.identity.sop_instance_uid in seen_sops:
            skipped.append(Skipped(path, "duplicate SOP Instance UID"))
            continue
        seen_sops.add(found.identity.sop_instance_uid)
        studies.setdefault(found.identity.study_uid, FoundStudy(found.identity.study_uid)).instances.append(found)
    return list(studies.values()), skipped
