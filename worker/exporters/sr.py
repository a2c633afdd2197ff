"""The draft as a DICOM Structured Report, IHE AI Results style, written with highdicom.

Default: a Comprehensive 3D SR whose root is a TID 1500 Measurement Report observed by a
device (the model), one measurement group per triage probe (tracking identifier, coded
qualitative evaluation present/absent at the probe's threshold, probability as a number),
and a Qualitative Evaluations container with the draft's free-text findings (anatomy,
laterality, severity) and the impression. ``PREREAD_SR_TEMPLATE=basic-text`` writes a
Basic Text SR with the same facts as text, for viewers that show only those.

Every SR of a study goes in one series ("AI PRE-READ DRAFT - NOT FOR DIAGNOSTIC USE");
UIDs are derived from the study and report, so sending again stores the same instance,
and a re-draft points at the SR it replaces (Predecessor Documents Sequence).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from typing import Any

import highdicom as hd
from highdicom.sr import (
    CodeContentItem,
    ContentItem,
    CodedConcept,
    ContainerContentItem,
    RelationshipTypeValues,
    TextContentItem,
)
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr.sop import _SR  # highdicom has no public Basic Text SR class; _SR is its documented base
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import BasicTextSRStorage, Comprehensive3DSRStorage, generate_uid

from preread.schemas.settings import Settings
from preread.worker.exporters.context import Concept, ExportContext, FindingItem, source_header

SERIES_DESCRIPTION = "AI PRE-READ DRAFT - NOT FOR DIAGNOSTIC USE"
SERIES_NUMBER = 990
MANUFACTURER = "infimed-preread"
PACKAGE = "infimed-preread"

# Concepts used in the content tree (DCM, SCT, UMLS, UCUM; PS3.16).
PRESENT = CodedConcept("52101004", "SCT", "Present")
ABSENT = CodedConcept("2667000", "SCT", "Absent")
INDETERMINATE = CodedConcept("82334004", "SCT", "Indeterminate")
PRESENCE = CodedConcept("705057003", "SCT", "Presence")
PROBABILITY = CodedConcept("C0033204", "UMLS", "Probability")
NO_UNITS = CodedConcept("1", "UCUM", "no units")
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
FINDING_SITE = CodedConcept("363698007", "SCT", "Finding Site")
LATERALITY = CodedConcept("272741003", "SCT", "Laterality")
SEVERITY = CodedConcept("246112005", "SCT", "Severity")
REPORT_TITLE_TEXT = CodedConcept("18748-4", "LN", "Diagnostic Imaging Report")
LATERALITIES = {
    "left": CodedConcept("7771000", "SCT", "Left"),
    "right": CodedConcept("24028007", "SCT", "Right"),
    "bilateral": CodedConcept("51440002", "SCT", "Right and left"),
}
SEVERITIES = {
    "mild": CodedConcept("255604002", "SCT", "Mild"),
    "moderate": CodedConcept("6736007", "SCT", "Moderate"),
    "severe": CodedConcept("24484000", "SCT", "Severe"),
}
PRESENCES = {"present": PRESENT, "absent": ABSENT, "uncertain": INDETERMINATE}
#: Procedure Reported when the source study carries no Procedure Code Sequence (by modality).
PROCEDURES = {
    "CT": CodedConcept("77477000", "SCT", "Computed Tomography"),
    "MR": CodedConcept("113091000", "SCT", "Magnetic Resonance Imaging"),
    "CR": CodedConcept("168537006", "SCT", "Plain radiography"),
    "DX": CodedConcept("168537006", "SCT", "Plain radiography"),
    "US": CodedConcept("16310003", "SCT", "Ultrasonography"),
}
IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging")
#: Our private coding scheme (PS3.16 8.2: designators starting "99" are local), declared in every SR that uses it.
PRIVATE_SCHEME = "99PREREAD"
PRIVATE_SCHEME_ITEM = CodingSchemeIdentificationItem(
    designator=PRIVATE_SCHEME, name="infimed-preread probe concepts", responsible_organization="infimed-preread"
)


class BasicTextSR(_SR):
    """A Basic Text SR document (highdicom writes the other SR IODs; this one only sets the SOP class)."""

    def __init__(self, evidence: Sequence[Dataset], content: Dataset, **kwargs: object) -> None:
        super().__init__(evidence=evidence, content=content, sop_class_uid=BasicTextSRStorage, **kwargs)  # type: ignore[arg-type]


def package_version() -> str:
    """This package's version, for Software Versions."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover (run from a bare tree)
        return "0+unknown"


def sr_series_uid(study_uid: str) -> str:
    """The study's AI pre-read SR series: the same for every draft of the study."""
    return str(generate_uid(entropy_srcs=["preread-sr-series", study_uid]))


def sr_instance_uid(study_uid: str, report_id: int, created_at: object) -> str:
    """The SR of one report: derived, so a resend stores the same instance, never a duplicate."""
    return str(generate_uid(entropy_srcs=["preread-sr", study_uid, str(report_id), str(created_at)]))


def device_observer_uid(model_id: str, revision: str | None, prompt_version: str) -> str:
    """Device Observer UID: one per (model id, revision, prompt version)."""
    return str(generate_uid(entropy_srcs=["preread-device", model_id, revision or "", prompt_version]))


def _lo(value: str, limit: int = 64) -> str:
    """A value clipped to a VR's length, keeping its end (a model path's last parts say the most)."""
    return value if len(value) <= limit else value[-limit:]


def software_versions(ctx: ExportContext) -> list[str]:
    """Package version, model revision, prompt version."""
    return [_lo(package_version()), _lo(ctx.model_revision or "unpinned"), _lo(ctx.prompt_version)]


def _coded(concept: Concept) -> CodedConcept:
    return CodedConcept(concept.code, concept.scheme, concept.meaning[:64])


def _evidence(ctx: ExportContext, header: Dataset) -> list[Dataset]:
    """The source header first (highdicom copies the Patient, General Study and Patient Study modules from it), then one reference per instance the model saw."""
    head = header  # a fresh read of the source header: completed in place, not copied (copying costs ~10 ms)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                    "StudyDate", "StudyTime", "ReferringPhysicianName"):
        if keyword not in head:
            setattr(head, keyword, None)
    out = [head]
    for source in ctx.seen:
        if source.sop_instance_uid == header.SOPInstanceUID:
            continue
        ref = Dataset()
        ref.StudyInstanceUID = ctx.study_instance_uid
        ref.SeriesInstanceUID = source.series_instance_uid
        ref.SOPClassUID = source.sop_class_uid
        ref.SOPInstanceUID = source.sop_instance_uid
        out.append(ref)
    return out


def _procedure(ctx: ExportContext, header: Dataset) -> CodedConcept:
    codes_seq = header.get("ProcedureCodeSequence")
    if codes_seq:
        item = codes_seq[0]
        return CodedConcept(item.CodeValue, item.CodingSchemeDesignator, str(item.CodeMeaning)[:64])
    return PROCEDURES.get(ctx.modality or "", IMAGING_PROCEDURE)


def _observer(ctx: ExportContext) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_observer_uid(ctx.model_id, ctx.model_revision, ctx.prompt_version),
        name=_lo(ctx.model_id),
        manufacturer_name=MANUFACTURER,
        model_name=_lo(ctx.model_id),
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _finding_item(finding: FindingItem) -> TextContentItem:
    item = TextContentItem(name=codes.DCM.Finding, value=finding.text, relationship_type=RelationshipTypeValues.CONTAINS)
    mods: list[ContentItem] = []
    if finding.anatomy:
        mods.append(TextContentItem(name=FINDING_SITE, value=finding.anatomy, relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD))
    if finding.laterality in LATERALITIES:
        mods.append(CodeContentItem(name=LATERALITY, value=LATERALITIES[finding.laterality],
                                    relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD))
    if finding.presence in PRESENCES:
        mods.append(CodeContentItem(name=PRESENCE, value=PRESENCES[finding.presence],
                                    relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD))
    if finding.severity in SEVERITIES:
        mods.append(CodeContentItem(name=SEVERITY, value=SEVERITIES[finding.severity],
                                    relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD))
    if mods:
        item.ContentSequence = hd.sr.ContentSequence(mods)
    return item


def _impression(ctx: ExportContext) -> str:
    """The impression, or the raw draft when it did not parse (never empty)."""
    return ctx.impression or ctx.draft_text or ctx.raw_output or "No draft text."


def _measurement_groups(ctx: ExportContext) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    algorithm = hd.sr.AlgorithmIdentification(name=_lo(ctx.model_id), version=_lo(ctx.prompt_version))
    groups = []
    for probe in ctx.probes:
        concept = _coded(probe.concept)
        tracking = hd.sr.TrackingIdentifier(
            uid=str(generate_uid(entropy_srcs=["preread-probe", ctx.study_instance_uid, str(ctx.report_id), probe.condition])),
            identifier=f"probe {probe.condition}",
        )
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                finding_type=concept,
                algorithm_id=algorithm,
                qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=concept, value=PRESENT if probe.present else ABSENT)],
                measurements=[hd.sr.Measurement(name=PROBABILITY, value=round(probe.score, 6), unit=NO_UNITS, algorithm_id=algorithm)],
            )
        )
    return groups


def _comprehensive_content(ctx: ExportContext, header: Dataset) -> Dataset:
    groups = _measurement_groups(ctx)
    if not groups:  # TID 1500 needs one group: an empty one tracking the draft itself
        groups = [hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=str(generate_uid(entropy_srcs=["preread-draft", ctx.study_instance_uid, str(ctx.report_id)])),
                identifier="draft",
            )
        )]
    report = hd.sr.MeasurementReport(
        observation_context=_observer(ctx), procedure_reported=_procedure(ctx, header), imaging_measurements=groups
    )
    root = report[0]
    evaluations = ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS)
    items: list[ContentItem] = [_finding_item(f) for f in ctx.findings]
    items.append(TextContentItem(name=codes.DCM.Impression, value=_impression(ctx), relationship_type=RelationshipTypeValues.CONTAINS))
    evaluations.ContentSequence = hd.sr.ContentSequence(items)
    root.ContentSequence.append(evaluations)
    return root


def _basic_text_content(ctx: ExportContext) -> Dataset:
    root = ContainerContentItem(name=REPORT_TITLE_TEXT)
    items: list[ContentItem] = [item for item in _observer(ctx) if isinstance(item, ContentItem)]
    for probe in ctx.probes:
        verdict = "present" if probe.present else "absent"
        items.append(TextContentItem(
            name=_coded(probe.concept),
            value=f"probability {probe.score:.3f}: {verdict} at threshold {probe.threshold:.2f}",
            relationship_type=RelationshipTypeValues.CONTAINS,
        ))
    for finding in ctx.findings:
        qualifiers = ", ".join(q for q in (finding.anatomy, finding.laterality, finding.severity) if q and q != "none")
        text = f"{finding.text} ({qualifiers})" if qualifiers else finding.text
        items.append(TextContentItem(name=codes.DCM.Finding, value=text, relationship_type=RelationshipTypeValues.CONTAINS))
    items.append(TextContentItem(name=codes.DCM.Impression, value=_impression(ctx), relationship_type=RelationshipTypeValues.CONTAINS))
    root.ContentSequence = hd.sr.ContentSequence(items)
    return root


def _predecessor(ctx: ExportContext, sop_class_uid: str) -> list[Dataset] | None:
    if not ctx.previous_reports:
        return None
    report_id, created_at = ctx.previous_reports[-1]
    pre = Dataset()
    pre.StudyInstanceUID = ctx.study_instance_uid
    pre.SeriesInstanceUID = sr_series_uid(ctx.study_instance_uid)
    pre.SOPClassUID = sop_class_uid
    pre.SOPInstanceUID = sr_instance_uid(ctx.study_instance_uid, report_id, created_at)
    return [pre]


def build_sr(ctx: ExportContext, settings: Settings, header: Dataset | None = None) -> Dataset:
    """The SR document of one report, as a pydicom Dataset ready to send or save."""
    header = header if header is not None else source_header(ctx)
    evidence = _evidence(ctx, header)
    basic = settings.sr_template == "basic-text"
    sop_class_uid = BasicTextSRStorage if basic else Comprehensive3DSRStorage
    equipment = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=_lo(ctx.model_id),
        software_versions=software_versions(ctx),
        contribution_description=_lo("AI pre-read draft by " + ctx.model_id),
    )
    common: dict[str, Any] = dict(
        evidence=evidence,
        series_instance_uid=sr_series_uid(ctx.study_instance_uid),
        series_number=SERIES_NUMBER,
        sop_instance_uid=sr_instance_uid(ctx.study_instance_uid, ctx.report_id, ctx.report_created_at),
        instance_number=ctx.ordinal,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=_lo(ctx.model_id),
        software_versions=software_versions(ctx),
        series_description=SERIES_DESCRIPTION,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=_predecessor(ctx, sop_class_uid),
        contributing_equipment=[equipment],
    )
    if any(p.concept.scheme == PRIVATE_SCHEME for p in ctx.probes):
        common["coding_schemes"] = [PRIVATE_SCHEME_ITEM]
    if basic:
        return BasicTextSR(content=_basic_text_content(ctx), **common)
    return hd.sr.Comprehensive3DSR(content=_comprehensive_content(ctx, header), **common)


def write_sr(dataset: Dataset, path: object) -> None:
    """Save an SR as a Part 10 file (callers write it atomically)."""
    dataset.save_as(path, enforce_file_format=True)  # type: ignore[arg-type]
