"""Real DICOM test files, studies cloned from them, and the study states a test waits for."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, func, select

from preread.schemas.tables import Study, StudyState


def testdata(name: str) -> Path:
    """A real DICOM file from pydicom's test data or pydicom-data, found offline."""
    from pydicom.data import get_testdata_file

    found = get_testdata_file(name)
    if found is None:
        raise FileNotFoundError(name)
    return Path(found)


def make_studies(folder: Path, count: int, source: str = "CT_small.dcm") -> list[Path]:
    """``count`` one-image studies cloned from a real CT, each with its own UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    original = pydicom.dcmread(testdata(source))
    files = []
    for i in range(count):
        ds = original.copy()
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = 1
        path = folder / f"study{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def states(url: str) -> dict[str, int]:
    """Studies per state in the database at ``url``."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {state: count for state, count in conn.execute(select(Study.state, func.count()).group_by(Study.state))}
    finally:
        engine.dispose()


def all_in(url: str, state: StudyState, count: int) -> bool:
    """True when exactly ``count`` studies exist and all are in ``state``."""
    now = states(url)
    return now.get(str(state), 0) == count and sum(now.values()) == count
