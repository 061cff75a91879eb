"""One call for every export of a stored report: the bytes, their MIME type and file name, and
the audit row. Used by the bridge's ``export_report`` op, the CLI and the delivery senders.

The study store is passed in (anything with the ``StudyStore`` methods ``get_study``,
``first_displayable`` and ``instance_path``), so this module needs no DICOM code until an SR or a thumbnail
of a received study is asked for.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from edge.errors import UsageError, require
from edge.reports.sr import require_signed
from edge.reports.store import ReportStore

log = logging.getLogger(__name__)

FORMATS = {
    "sr": ("application/dicom", "dcm"),
    "fhir": ("application/fhir+json", "json"),
    "pdf": ("application/pdf", "pdf"),
}
MAX_SOURCE_BYTES = 2 << 30  # a received instance read back for the SR's references


@dataclass(frozen=True)
class Export:
    format: str
    mime: str
    filename: str
    data: bytes


def source_instance(report: dict, studies: Any) -> tuple[str, str] | None:
    """(study UID, instance UID) of the received instance a report is on; None for an uploaded
    image. Without an instance UID in the source, the study's first displayable instance."""
    source = report["source"]
    if not source.get("study_uid"):
        return None
    if source.get("instance_uid"):
        return source["study_uid"], source["instance_uid"]
    if studies is None:
        return None
    instance = studies.first_displayable(source["study_uid"])
    return (source["study_uid"], instance) if instance else None


def source_dataset(report: dict, studies: Any):
    """The received instance (a pydicom Dataset, pixel data not loaded) the report's SR references,
    read from ``studies``; None for an uploaded image or without a study store."""
    where = source_instance(report, studies)
    if where is None or studies is None:
        return None
    pydicom = require("pydicom", "reports")
    path = studies.instance_path(*where)
    return pydicom.dcmread(path, stop_before_pixels=True)


def source_image(report: dict, studies: Any):
    """The report's image as a LoadedImage (windowed, for the PDF thumbnail), from the study store;
    None for an uploaded image (the caller passes that one) or without a study store."""
    where = source_instance(report, studies)
    if where is None or studies is None:
        return None
    from edge.media.images import load_image

    return load_image(studies.instance_path(*where), frame=report["source"].get("frame"))


def render(report: dict, fmt: str, *, studies: Any = None, image: Any = None, replaced: dict | None = None,
           organization: str = "—", institution: str | None = None, fhir_bundle: str = "collection") -> bytes:  # fmt: skip
    """The bytes of one export of a signed REPORT (no audit row: :func:`export_report` adds it)."""
    require_signed(report)
    if fmt == "sr":
        from edge.reports.sr import write_sr

        ds = source_dataset(report, studies)
        return write_sr(report, ds, replaced=replaced, organization=organization, institution=institution)
    if fmt == "fhir":
        from edge.reports.fhir import build_fhir

        patient = None
        if studies is not None and report["source"].get("study_uid"):
            study = studies.get_study(report["source"]["study_uid"])
            patient = {"id": study.get("patient_id") or None, "name": study.get("patient_name") or None}
        body = build_fhir(report, bundle_type=fhir_bundle, patient=patient)
        return json.dumps(body, ensure_ascii=False, indent=2).encode("utf-8")
    if fmt == "pdf":
        from edge.reports.pdf import build_pdf

        if image is None:
            image = source_image(report, studies)
        return build_pdf(report, image, institution=institution)
    raise UsageError(f"format must be one of {', '.join(FORMATS)}, not {str(fmt)[:20]!r}")


def export_report(store: ReportStore, report_id: str, fmt: str, *, version: int | None = None,
                  studies: Any = None, image: Any = None, actor: str | None = None, **options) -> Export:  # fmt: skip
    """Export a signed version (default: the latest) as ``fmt`` ("sr", "fhir", "pdf") and record
    it in the audit log.

    Args:
        studies: the study store (for a report on a received study: the SR's references, the
            patient of the FHIR bundle, the PDF's thumbnail).
        image: the LoadedImage for the PDF of an uploaded image.
        options: ``organization``, ``institution``, ``fhir_bundle`` (see :func:`render`).
    Raises:
        NotFoundError: no such report or version.
        ConflictError: the version is a draft.
        UsageError: an unknown format.
    """
    if fmt not in FORMATS:
        raise UsageError(f"format must be one of {', '.join(FORMATS)}, not {str(fmt)[:20]!r}")
    report = store.get(report_id, version)
    require_signed(report)
    replaced = store.get(report_id, report["replaces"]) if report.get("replaces") else None
    data = render(report, fmt, studies=studies, image=image, replaced=replaced, **options)
    with store.transaction() as c:
        store.record(
            c, report_id, report["version"], "export", actor=actor, detail=f"{fmt}, {len(data)} bytes"
        )
    mime, ext = FORMATS[fmt]
    log.info("report %s v%d exported as %s (%d bytes)", report_id, report["version"], fmt, len(data))
    return Export(
        fmt, mime, f"{report_id}-v{report['version']}.{ext if fmt != 'fhir' else 'fhir.json'}", data
    )
