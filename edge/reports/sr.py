"""A signed report as a DICOM Comprehensive SR (highdicom), for a PACS.

The document follows the shape of TID 2000 (Basic Diagnostic Imaging Report) without claiming
the template: a root container "Diagnostic Imaging Report" (18748-4, LN) with

- the observation context: the signer as the person observer, the model as the device observer
  (manufacturer "medgemma-edge", model name, version) and its algorithm identification
  (TID 4019: name, version, parameters = bundle, quantization, synthetic);
- "Findings" (121070, DCM): one "Finding" (121071) text item per finding, with its "Finding
  Site" (363698007, SCT) and "Certainty of Finding" (111012, DCM) as properties, and a
  reference to the source image ("Best illustration of finding", 121080) when the report is on a
  received instance;
- "Impressions" (121072) / "Impression" (121073), "Recommendations" (121074) / "Recommendation"
  (121075);
- the disclaimer as a "Comment" (121106) and the provenance, the signer's role and (for an
  uploaded image) its sha256 as text items under local codes (scheme ``99MGE``).

VerificationFlag VERIFIED with a VerifyingObserverSequence (the signer, the organization,
signed_at); CompletionFlag COMPLETE, PreliminaryFlag FINAL. The UIDs are fixed by the report:
SOP Instance UID = its ``sr_sop_instance_uid``; the series (and, for an uploaded image, the
study) UIDs derive from the report id, so every version of a report lands in one series and a
resend is byte-for-byte the same document. An amendment lists the SR of the version it replaces
in the Predecessor Documents Sequence.
"""

from __future__ import annotations

import io
import uuid
from datetime import datetime
from typing import Any

from edge.errors import ConflictError, UsageError, require
from edge.reports.content import DISCLAIMER

MANUFACTURER = "medgemma-edge"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR Storage
SCHEME = "99MGE"  # a local coding scheme (PS3.16: designators starting 99 are private)
_NS = uuid.UUID("5b9d3c5e-8f0a-4d0e-9a43-6f1f6c2d8e01")  # names the UIDs derived from report ids


def derived_uid(*parts: str) -> str:
    """A stable UID under 2.25 for ``parts`` (uuid5): the same report always gets the same one."""
    return f"2.25.{uuid.uuid5(_NS, '/'.join(parts)).int}"


def require_signed(report: dict) -> None:
    """ConflictError unless ``report`` is a signed version (exports are made only from those)."""
    if report.get("status") != "signed":
        raise ConflictError(
            f"report {report.get('report_id')} version {report.get('version')} is a draft: "
            "sign it before exporting or sending it"
        )


def person_name(name: str) -> str:
    """A typed name as a DICOM PN: "Ada Lovelace" -> "Lovelace^Ada", "Lovelace, Ada" -> the
    same, one word -> "Word^"; kept as is when it already has '^'."""
    name = " ".join(name.replace("\\", " ").replace("=", " ").split())
    if "^" in name:
        return name[:64]
    if "," in name:
        family, _, given = name.partition(",")
        return f"{family.strip()}^{given.strip()}"[:64]
    *given, family = name.split(" ")
    return f"{family}^{' '.join(given)}"[:64]


def _dt(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def _provenance_text(provenance: dict) -> str:
    return "; ".join(f"{k}={v}" for k, v in provenance.items())


def build_sr(
    report: dict,
    source_dataset: Any = None,
    *,
    replaced: dict | None = None,
    organization: str = "—",
    institution: str | None = None,
):
    """The Comprehensive SR of a signed report (a highdicom ``ComprehensiveSR``, a pydicom Dataset).

    Args:
        report: a signed REPORT (:meth:`edge.reports.store.ReportStore.get`).
        source_dataset: the received instance the report is on (read from the study store): the
            SR joins its study, copies its patient and study attributes and references it as
            evidence. Required when the report's source names a study; None for an uploaded
            image, whose SR starts a new study with an unknown patient.
        replaced: the signed REPORT this version amends (its SR becomes the predecessor).
        organization: the verifying organization (the clinic), "—" when not configured.
        institution: InstitutionName, when configured.
    Raises:
        ConflictError: the report is not signed.
        UsageError: the source dataset is missing or is not the report's source instance.
    """
    require_signed(report)
    hd = require("highdicom", "reports")
    pydicom = require("pydicom", "reports")
    import highdicom.coding_schemes  # noqa: F401  (not imported by highdicom itself)
    from highdicom.sr import CodedConcept as C
    from pydicom.sr.codedict import codes

    source, final, prov = report["source"], report["final"], report["provenance"]
    evidence = _evidence(report, source_dataset, pydicom)
    rel = hd.sr.RelationshipTypeValues
    signed = _dt(report["signed_at"])
    signer = report["signer"]

    def text(name, value, how=rel.CONTAINS):
        return hd.sr.TextContentItem(name=name, value=value, relationship_type=how)

    def section(name, items):
        box = hd.sr.ContainerContentItem(name=name, relationship_type=rel.CONTAINS)
        box.ContentSequence = hd.sr.ContentSequence(items)
        return box

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid("device", prov["model"], str(prov.get("bundle"))),
        name=MANUFACTURER,
        manufacturer_name=MANUFACTURER,
        model_name=str(prov["model"])[:64],
    )
    person = hd.sr.PersonObserverIdentifyingAttributes(
        name=person_name(signer["name"]), organization_name=organization[:64]
    )
    context = hd.sr.ObservationContext(
        observer_person_context=hd.sr.ObserverContext(observer_type=codes.DCM.Person, observer_identifying_attributes=person),
        observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=device),
    )  # fmt: skip
    algorithm = hd.sr.AlgorithmIdentification(
        name=str(prov["model"])[:64],
        version=str(prov.get("runtime_version") or "unknown")[:64],
        parameters=[f"{k}={prov.get(k)}"[:64] for k in ("bundle", "quantization", "synthetic") if k in prov],
    )

    findings = []
    for f in final["findings"]:
        item = text(codes.DCM.Finding, f["finding"])
        props = [text(codes.DCM.CertaintyOfFinding, f["certainty"], rel.HAS_PROPERTIES)]
        if f.get("location"):
            props.insert(0, text(codes.SCT.FindingSite, f["location"], rel.HAS_PROPERTIES))
        item.ContentSequence = hd.sr.ContentSequence(props)
        findings.append(item)
    if not findings:
        findings.append(text(codes.DCM.Finding, "No findings recorded."))
    if source_dataset is not None:
        findings.append(
            hd.sr.ImageContentItem(
                name=codes.DCM.BestIllustrationOfFinding,
                referenced_sop_class_uid=source_dataset.SOPClassUID,
                referenced_sop_instance_uid=source_dataset.SOPInstanceUID,
                referenced_frame_numbers=_frame(source, source_dataset),
                relationship_type=rel.CONTAINS,
            )
        )
    items = [*context, *algorithm]
    items.append(
        text(C("MGE-MOD", SCHEME, "Modality described"), final["modality"] or "unknown", rel.HAS_CONCEPT_MOD)
    )
    items.append(section(codes.DCM.Findings, findings))
    items.append(section(codes.DCM.Impressions, [text(codes.DCM.Impression, final["impression"])]))
    if final.get("recommendation"):
        items.append(
            section(codes.DCM.Recommendations, [text(codes.DCM.Recommendation, final["recommendation"])])
        )
    items.append(text(codes.DCM.Comment, DISCLAIMER))
    items.append(text(C("MGE-ROLE", SCHEME, "Signer role"), signer["role"]))
    items.append(text(C("MGE-PROV", SCHEME, "Provenance"), _provenance_text(prov)))
    items.append(
        text(C("MGE-RPT", SCHEME, "Report identifier"), f"{report['report_id']} version {report['version']}")
    )
    if source_dataset is None:
        items.append(text(C("MGE-SHA", SCHEME, "Source image SHA-256"), source["image_sha256"]))
    root = hd.sr.ContainerContentItem(name=codes.LN.DiagnosticImagingReport)
    root.ContentSequence = hd.sr.ContentSequence(items)  # fmt: skip

    predecessors = None
    if replaced is not None and replaced.get("sr_sop_instance_uid"):
        pre = pydicom.Dataset()
        pre.SOPClassUID = COMPREHENSIVE_SR
        pre.SOPInstanceUID = replaced["sr_sop_instance_uid"]
        pre.StudyInstanceUID = evidence.StudyInstanceUID
        pre.SeriesInstanceUID = derived_uid("series", report["report_id"])
        predecessors = [pre]
    try:
        sr = hd.sr.ComprehensiveSR(
            evidence=[evidence],
            content=root,
            series_instance_uid=derived_uid("series", report["report_id"]),
            series_number=9901,
            sop_instance_uid=report["sr_sop_instance_uid"],
            instance_number=int(report["version"]),
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=True,
            is_verified=True,
            verifying_observer_name=person_name(signer["name"]),
            verifying_organization=organization[:64],
            institution_name=institution,
            previous_versions=predecessors,
            series_description="AI-drafted report, clinician-signed",
            manufacturer_model_name=str(prov["model"])[:64],
            software_versions=str(prov.get("runtime_version") or "unknown")[:64],
            content_date=signed.date(),
            content_time=signed.time().replace(tzinfo=None),
            series_date=signed.date(),
            series_time=signed.time().replace(tzinfo=None),
            specific_character_set="ISO_IR 192",
            contributing_equipment=[
                hd.ContributingEquipment(
                    manufacturer=MANUFACTURER,
                    purpose_of_reference=codes.DCM.ProcessingEquipment,
                    manufacturer_model_name=str(prov["model"])[:64],
                    software_versions=str(prov.get("runtime_version") or "unknown")[:64],
                    contribution_datetime=signed.replace(tzinfo=None),
                    contribution_description="drafted the report the clinician reviewed and signed",
                )
            ],
            coding_schemes=[
                hd.coding_schemes.CodingSchemeIdentificationItem(
                    designator=SCHEME, name="medgemma-edge local codes"
                )
            ],
        )
    except ValueError as exc:
        raise UsageError(f"can't build the DICOM SR of report {report['report_id']}: {exc}") from None
    sr.VerifyingObserverSequence[0].VerificationDateTime = signed.strftime("%Y%m%d%H%M%S.%f+0000")
    sr.InstanceCreationDate, sr.InstanceCreationTime = signed.strftime("%Y%m%d"), signed.strftime("%H%M%S")
    sr.TimezoneOffsetFromUTC = "+0000"
    sr.ContributingEquipmentSequence[-1].ContributionDateTime = signed.strftime(
        "%Y%m%d%H%M%S"
    )  # highdicom's: "now"
    if source_dataset is None:  # the placeholder evidence is no instance: nothing to reference
        for name in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
            if name in sr:
                delattr(sr, name)
    return sr


def write_sr(report: dict, source_dataset: Any = None, **options) -> bytes:
    """:func:`build_sr` as the bytes of a DICOM file (Part 10, explicit VR little endian)."""
    sr = build_sr(report, source_dataset, **options)
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _frame(source: dict, ds) -> list[int] | None:
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 and source.get("frame") is not None:
        return [int(source["frame"]) + 1]  # DICOM frame numbers count from 1
    return None


def _evidence(report: dict, ds, pydicom):
    """The instance the SR inherits its patient and study from: the source dataset, or for an
    uploaded image a placeholder for a new study whose patient is unknown."""
    source = report["source"]
    if ds is None:
        if source.get("study_uid"):
            raise UsageError(
                f"report {report['report_id']} is on a received study: its DICOM SR needs that instance "
                "from the study store (it is not there any more, or no study store was given)"
            )
        ph = pydicom.Dataset()
        ph.StudyInstanceUID = derived_uid("study", report["report_id"])
        ph.SOPInstanceUID = derived_uid("placeholder", report["report_id"])
        ph.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # never referenced: removed after building
        ph.SeriesInstanceUID = derived_uid("placeholder-series", report["report_id"])
        ph.PatientID, ph.PatientName, ph.PatientBirthDate, ph.PatientSex = "", "", "", ""
        ph.AccessionNumber, ph.StudyID, ph.ReferringPhysicianName = "", "", ""
        signed = _dt(report["signed_at"])
        ph.StudyDate, ph.StudyTime = signed.strftime("%Y%m%d"), signed.strftime("%H%M%S")
        return ph
    for key, attr in (("study_uid", "StudyInstanceUID"), ("instance_uid", "SOPInstanceUID")):
        if source.get(key) and str(getattr(ds, attr, "")) != source[key]:
            raise UsageError(f"the source dataset is not the report's source instance ({attr} differs)")
    for attr in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not getattr(ds, attr, None):
            raise UsageError(f"the source dataset has no {attr}: it can't be referenced by an SR")
    return ds
