"""Studies for sweep tests: real pydicom files given new UIDs and study dates."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from tests.conftest import testdata


def make_study(folder: Path, day: date, instances: int = 1, source: str = "CT_small.dcm", hour: int = 10,
               modality: str | None = None) -> tuple[str, list[Path]]:
    """One study dated ``day`` with ``instances`` images in one series; returns (Study Instance UID, files)."""
    folder.mkdir(parents=True, exist_ok=True)
    original = pydicom.dcmread(testdata(source))
    study_uid, series_uid = generate_uid(), generate_uid()
    files = []
    for i in range(instances):
        ds = original.copy()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyDate = ds.SeriesDate = day.strftime("%Y%m%d")
        ds.StudyTime = f"{hour:02d}1500"
        ds.InstanceNumber = i + 1
        if modality:
            ds.Modality = modality
        path = folder / f"{study_uid}-{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return study_uid, files


#: The three study dates of the tests: the sweeps cover the first two.
DAY1, DAY2, DAY3 = date(2024, 3, 4), date(2024, 3, 5), date(2024, 3, 7)


def three_dates(folder: Path, per_day: int = 2, instances: int = 1) -> dict[date, list[tuple[str, list[Path]]]]:
    """``per_day`` studies on each of three dates."""
    return {
        day: [make_study(folder / day.isoformat(), day, instances, hour=8 + k) for k in range(per_day)]
        for day in (DAY1, DAY2, DAY3)
    }
