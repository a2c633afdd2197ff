"""Synthetic DICOM series for tests and benchmarks (no patient data).

Builds real, standard-conformant files with pydicom: CT or MR slices with
Image Position/Orientation, Image Type, rescale and a window; localizers,
secondary-capture dose screens, dose SR and projection views.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
XRAY_DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def _base(sop_class: str, study_uid: str, series_uid: str, modality: str, series_number: int, description: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.PatientID = "SYNTH"
    ds.PatientName = "Synthetic^Phantom"
    return ds


def _pixels(ds: Dataset, arr: np.ndarray, signed: bool) -> None:
    ds.Rows, ds.Columns = arr.shape[:2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = arr.astype(np.int16 if signed else np.uint16).tobytes()


def phantom(rows: int, columns: int, z: float, seed: int = 0) -> np.ndarray:
    """A head-like CT phantom slice in stored values (HU + 1024): air, skull, brain, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[-1 : 1 : rows * 1j, -1 : 1 : columns * 1j]
    r = np.sqrt(x**2 + (y * 1.15) ** 2) * (1.0 + 0.002 * z)
    hu = np.full((rows, columns), -1000.0)
    hu[r < 0.9] = 1200.0  # skull
    brain = r < 0.82
    hu[brain] = (35.0 + 8.0 * np.sin(6 * x + z / 20.0))[brain]
    hu[(np.abs(x) < 0.05) & (r < 0.82)] = 5.0  # ventricle
    hu += rng.normal(0.0, 6.0, hu.shape)
    return np.clip(hu + 1024.0, 0, 4095).astype(np.int16)


def image_slice(
    *,
    study_uid: str,
    series_uid: str,
    series_number: int,
    instance_number: int,
    position: Sequence[float],
    orientation: Sequence[float] = AXIAL,
    modality: str = "CT",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    description: str = "",
    rows: int = 64,
    columns: int = 64,
    pixels: np.ndarray | None = None,
    window: tuple[float, float] | None = (40.0, 400.0),
) -> Dataset:
    """One CT or MR slice at ``position`` (Image Position (Patient), mm)."""
    sop = CT_IMAGE if modality == "CT" else MR_IMAGE
    ds = _base(sop, study_uid, series_uid, modality, series_number, description)
    ds.ImageType = list(image_type)
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 1.0
    arr = pixels if pixels is not None else phantom(rows, columns, float(position[2]), seed=instance_number)
    _pixels(ds, arr, signed=True)
    if modality == "CT":
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    return ds


def projection(*, study_uid: str, series_uid: str, series_number: int, instance_number: int, view: str, modality: str = "CR") -> Dataset:
    """One projection radiograph (CR/DX/MG), MONOCHROME1 like many CR systems."""
    sop = CR_IMAGE if modality == "CR" else DX_IMAGE
    ds = _base(sop, study_uid, series_uid, modality, series_number, f"Chest {view}")
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.InstanceNumber = instance_number
    ds.ViewPosition = view
    arr = (phantom(80, 64, float(instance_number)) % 1024).astype(np.uint16)
    _pixels(ds, arr, signed=False)
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.WindowCenter, ds.WindowWidth = 512, 1024
    return ds


def dose_screen(*, study_uid: str, series_uid: str, series_number: int = 999) -> Dataset:
    """A 'Dose Report' secondary capture, as CT scanners send."""
    ds = _base(SECONDARY_CAPTURE, study_uid, series_uid, "CT", series_number, "Dose Report")
    ds.ImageType = ["DERIVED", "SECONDARY", "SCREEN SAVE"]
    ds.InstanceNumber = 1
    _pixels(ds, np.zeros((32, 48), np.uint16), signed=False)
    return ds


def dose_sr(*, study_uid: str, series_uid: str, series_number: int = 998) -> Dataset:
    """An X-Ray Radiation Dose SR (no pixel data)."""
    ds = _base(XRAY_DOSE_SR, study_uid, series_uid, "SR", series_number, "Radiation Dose Information")
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    return ds


def save(ds: Dataset, folder: Path, name: str | None = None) -> Path:
    """Write ``ds`` under ``folder`` (named by its SOP Instance UID) and return the path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or f"{ds.SOPInstanceUID}.dcm")
    ds.save_as(path, enforce_file_format=True)
    return path


def ct_series(
    folder: Path,
    *,
    study_uid: str,
    n: int,
    series_number: int,
    z0: float = 0.0,
    spacing: float = 2.5,
    description: str = "Axial",
    shuffle_instance_numbers: bool = False,
    rows: int = 64,
    columns: int = 64,
    orientation: Sequence[float] = AXIAL,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
) -> list[Path]:
    """``n`` slices of one series; with ``shuffle_instance_numbers``, Instance Number does not follow position."""
    series_uid = generate_uid()
    numbers = list(range(1, n + 1))
    if shuffle_instance_numbers:
        numbers = list(np.random.default_rng(7).permutation(numbers) + 0)
    normal = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))
    paths = []
    for i in range(n):
        pos = np.asarray([-16.0, -16.0, 0.0]) + normal * (z0 + i * spacing)
        ds = image_slice(
            study_uid=study_uid,
            series_uid=series_uid,
            series_number=series_number,
            instance_number=int(numbers[i]),
            position=pos.tolist(),
            orientation=orientation,
            image_type=image_type,
            description=description,
            rows=rows,
            columns=columns,
        )
        paths.append(save(ds, folder / f"s{series_number}"))
    return paths
