"""Selection of the series and frames a 2D model sees, on generated studies."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from preread.ingest.render import Kind, SelectionPolicy, read_header, select_frames
from preread.ingest.render.selection import InstanceHeader, evenly_spaced
from tests.support.synthetic import CORONAL, ct_series, dose_screen, dose_sr, image_slice, projection, save


def _study(tmp_path: Path) -> tuple[list[Path], dict[str, list[Path]]]:
    """Localizer, 12- and 30-slice axial series (the long one with shuffled Instance Numbers), dose SR and dose screen."""
    st = generate_uid()
    parts: dict[str, list[Path]] = {}
    loc_series = generate_uid()
    parts["localizer"] = [
        save(
            image_slice(
                study_uid=st,
                series_uid=loc_series,
                series_number=1,
                instance_number=i + 1,
                position=(0.0, 0.0, 0.0),
                orientation=CORONAL,
                image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                description="Topogram 0.6 T20f",
            ),
            tmp_path / "loc",
        )
        for i in range(2)
    ]
    parts["short"] = ct_series(tmp_path, study_uid=st, n=12, series_number=2, spacing=5.0)
    parts["long"] = ct_series(tmp_path, study_uid=st, n=30, series_number=3, spacing=1.0, z0=-15.0, shuffle_instance_numbers=True)
    parts["dose"] = [
        save(dose_sr(study_uid=st, series_uid=generate_uid()), tmp_path / "sr"),
        save(dose_screen(study_uid=st, series_uid=generate_uid()), tmp_path / "sc"),
    ]
    files = [p for ps in parts.values() for p in ps]
    return files, parts


def test_evenly_spaced_bins() -> None:
    assert evenly_spaced(30, 4) == [3, 11, 18, 26]
    assert evenly_spaced(3, 4) == [0, 1, 2]
    assert evenly_spaced(0, 4) == [] and evenly_spaced(5, 0) == []
    assert evenly_spaced(500, 1) == [250]


def test_kinds(tmp_path: Path) -> None:
    files, parts = _study(tmp_path)
    kinds = {p: read_header(p).kind for p in files}
    assert {kinds[p] for p in parts["localizer"]} == {Kind.LOCALIZER}
    assert {kinds[p] for p in parts["dose"]} == {Kind.DOSE_REPORT}
    assert {kinds[p] for p in parts["short"] + parts["long"]} == {Kind.IMAGE}


def test_picks_longest_primary_axial_evenly_by_position(tmp_path: Path) -> None:
    files, parts = _study(tmp_path)
    headers = [read_header(p) for p in files]
    refs = select_frames(headers, max_images=4)
    long_series = read_header(parts["long"][0]).series_instance_uid
    assert len(refs) == 4
    assert {r.series_instance_uid for r in refs} == {long_series}
    # Positions along the normal run -15 .. 14 mm; bin centres of 30 slices in 4 bins.
    assert [r.position for r in refs] == [-15.0 + i for i in evenly_spaced(30, 4)]
    # Instance Numbers were shuffled: the order is by position, not by number.
    numbers = [r.header.instance_number for r in refs]
    assert numbers != sorted(numbers)


def test_all_slices_when_under_budget(tmp_path: Path) -> None:
    files, parts = _study(tmp_path)
    refs = select_frames([read_header(p) for p in parts["short"] + parts["dose"]], max_images=50)
    assert len(refs) == 12
    assert [r.position for r in refs] == sorted(r.position for r in refs)  # type: ignore[type-var]


def test_primary_axial_beats_longer_reformat(tmp_path: Path) -> None:
    st = generate_uid()
    axial = ct_series(tmp_path, study_uid=st, n=10, series_number=2)
    coronal = ct_series(
        tmp_path, study_uid=st, n=40, series_number=3, orientation=CORONAL, image_type=("DERIVED", "SECONDARY", "MPR")
    )
    refs = select_frames([read_header(p) for p in axial + coronal], max_images=4)
    assert {r.series_instance_uid for r in refs} == {read_header(axial[0]).series_instance_uid}


def test_projection_keeps_every_view(tmp_path: Path) -> None:
    st = generate_uid()
    series = generate_uid()
    views = [
        save(projection(study_uid=st, series_uid=series, series_number=1, instance_number=i + 1, view=v), tmp_path)
        for i, v in enumerate(("PA", "LL"))
    ]
    other = generate_uid()
    views.append(save(projection(study_uid=st, series_uid=other, series_number=2, instance_number=1, view="AP", modality="DX"), tmp_path))
    refs = select_frames([read_header(p) for p in views], max_images=4)
    assert sorted(r.header.path for r in refs) == sorted(views)


def test_skipped_kinds_only_when_asked(tmp_path: Path) -> None:
    files, parts = _study(tmp_path)
    only_loc = [read_header(p) for p in parts["localizer"] + parts["dose"]]
    # Nothing else to show: the localizer is used rather than nothing.
    assert {r.header.path for r in select_frames(only_loc, 4)} == set(parts["localizer"])
    with_screens = SelectionPolicy(include=frozenset({Kind.DOSE_REPORT}))
    screen = [read_header(parts["dose"][1])]
    assert select_frames(screen, 4) == []
    assert len(select_frames(screen, 4, with_screens)) == 1


@pytest.mark.parametrize("max_images", [1, 2, 4])
def test_budget_respected(tmp_path: Path, max_images: int) -> None:
    files, _ = _study(tmp_path)
    assert len(select_frames([read_header(p) for p in files], max_images)) == max_images


def _header(sop_class: str, modality: str) -> InstanceHeader:
    return InstanceHeader(
        path=Path("x.dcm"), sop_instance_uid=generate_uid(), sop_class_uid=sop_class, series_instance_uid=generate_uid(),
        modality=modality, image_type=(), series_number=1, instance_number=1, series_description="",
        rows=0, columns=0, number_of_frames=1, has_pixels=False, orientation=None,
    )


#: Every radiation dose SR SOP class (PS3.4 B.5): a dose report, never an ordinary SR.
DOSE_SR_CLASSES = {"XRayRadiationDoseSRStorage", "RadiopharmaceuticalRadiationDoseSRStorage",
                   "PatientRadiationDoseSRStorage", "EnhancedXRayRadiationDoseSRStorage"}


@pytest.mark.parametrize("modality", ["SR", ""])
def test_every_sr_and_dose_sop_class_is_skipped_and_dose_reports_are_told_apart(modality: str) -> None:
    import pydicom.uid
    from pynetdicom import sop_class

    # every SR-family storage class pynetdicom knows (PS3.4 B.5: the Basic Text SR's siblings), by name
    family = sop_class.BasicTextSRStorage.rsplit(".", 1)[0] + "."
    classes = {name: str(uid) for name, uid in vars(sop_class).items()
               if isinstance(uid, str) and uid.startswith(family)}
    assert DOSE_SR_CLASSES <= classes.keys() and "PlannedImagingAgentAdministrationSRStorage" in classes
    for name, uid in classes.items():
        kind = _header(uid, modality).kind
        if name in DOSE_SR_CLASSES:
            assert kind == Kind.DOSE_REPORT, name
        elif name == "KeyObjectSelectionDocumentStorage":
            assert kind == Kind.KO, name
        else:
            assert kind == Kind.SR, name  # e.g. Planned Imaging Agent Administration SR is not a dose report
        assert kind != Kind.IMAGE
    # the names selection uses are pydicom's, and they are the standard's UIDs
    assert pydicom.uid.PatientRadiationDoseSRStorage == classes["PatientRadiationDoseSRStorage"]
    assert pydicom.uid.EnhancedXRayRadiationDoseSRStorage == classes["EnhancedXRayRadiationDoseSRStorage"]
