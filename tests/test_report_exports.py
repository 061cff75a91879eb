"""Exports of a signed report (edge.reports.sr / fhir / pdf / exports): from an uploaded image and
from a received study. The SR is read back with pydicom/highdicom and checked with dciodvfy
(dicom3tools); the FHIR Bundle parses with fhir.resources; the PDF renders with pdftoppm and its
text (pdftotext) has the impression and the signer."""

from __future__ import annotations

import io
import json
import subprocess

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes
from test_reports import FINAL, PROVENANCE, UPLOADED, final, new_report, signed_report

from edge.errors import ConflictError, UsageError
from edge.reports.content import DISCLAIMER
from edge.reports.exports import export_report, render
from edge.reports.fhir import build_fhir
from edge.reports.pdf import build_pdf
from edge.reports.sr import build_sr, person_name, write_sr
from edge.reports.store import ReportStore

CT = get_testdata_file("CT_small.dcm")


@pytest.fixture
def store(tmp_path):
    s = ReportStore(tmp_path / "reports")
    yield s
    s.close()


class DatasetStudies:
    """The StudyStore methods the exports use, over one pydicom file: used only
    when edge.studies.store is not importable, so the test runs either way."""

    def __init__(self, path):
        self.path, self.ds = path, pydicom.dcmread(path)

    def instance_path(self, study_uid, instance_uid):
        assert (study_uid, instance_uid) == (self.ds.StudyInstanceUID, self.ds.SOPInstanceUID)
        return self.path

    def get_study(self, study_uid):
        return {"study_uid": study_uid, "patient_id": str(self.ds.PatientID), "patient_name": str(self.ds.PatientName),
                "series": [{"instances": [{"sop_instance_uid": self.ds.SOPInstanceUID, "displayable": True}]}]}  # fmt: skip

    def first_displayable(self, study_uid):
        return self.ds.SOPInstanceUID

    def close(self):
        pass


@pytest.fixture
def received(tmp_path):
    """(studies, source) for the CT sample received into a study store."""
    try:
        from edge.studies.store import StudyStore
    except ImportError:
        studies = DatasetStudies(CT)
        ds = studies.ds
        source = {
            "study_uid": ds.StudyInstanceUID,
            "series_uid": ds.SeriesInstanceUID,
            "instance_uid": ds.SOPInstanceUID,
        }
    else:
        studies = StudyStore(tmp_path / "studies")
        st = studies.add_file(CT)
        source = {"study_uid": st.study_uid, "series_uid": st.series_uid, "instance_uid": st.sop_instance_uid}
    yield studies, source
    studies.close()


def dciodvfy(tmp_path, data: bytes) -> list[str]:
    """dciodvfy's complaints about a DICOM file; asserts there is no "Error" among them."""
    path = tmp_path / "check.dcm"
    path.write_bytes(data)
    res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line]
    assert not errors, "\n".join(lines)
    return [line for line in lines if line.startswith("Warning")]


def content_items(ds, name):
    from highdicom.sr.utils import find_content_items

    return find_content_items(ds, name=name, recursive=True)


def test_sr_of_an_uploaded_image(store, tmp_path):
    r = signed_report(store)
    data = write_sr(r)
    warnings = dciodvfy(tmp_path, data)
    assert all("99MGE" in w or "DICOMDIR" in w for w in warnings), warnings  # local codes, unknown patient

    import highdicom as hd

    sr = hd.sr.srread(io.BytesIO(data))
    assert type(sr).__name__ == "ComprehensiveSR" and sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    assert (
        sr.SOPInstanceUID == r["sr_sop_instance_uid"]
        and sr.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    )
    assert (sr.VerificationFlag, sr.CompletionFlag, sr.PreliminaryFlag) == ("VERIFIED", "COMPLETE", "FINAL")
    observer = sr.VerifyingObserverSequence[0]
    assert observer.VerifyingObserverName == "Lovelace^Ada" and observer.VerifyingOrganization == "—"
    assert observer.VerificationDateTime.startswith(
        r["signed_at"][:19].replace("-", "").replace("T", "").replace(":", "")
    )
    assert [i.TextValue for i in content_items(sr, codes.DCM.Finding)] == [
        f["finding"] for f in FINAL["findings"]
    ]
    assert [i.TextValue for i in content_items(sr, codes.SCT.FindingSite)] == ["right lower zone"]
    assert [i.TextValue for i in content_items(sr, codes.DCM.CertaintyOfFinding)] == ["probable", "absent"]
    assert content_items(sr, codes.DCM.Impression)[0].TextValue == "Right lower lobe pneumonia."
    assert content_items(sr, codes.DCM.Recommendation)[0].TextValue == FINAL["recommendation"]
    assert content_items(sr, codes.DCM.Comment)[0].TextValue == DISCLAIMER
    texts = {
        i.ConceptNameCodeSequence[0].CodeMeaning: i.TextValue
        for i in content_items(sr, None)
        if "TextValue" in i
    }
    assert texts["Source image SHA-256"] == UPLOADED["image_sha256"] and texts["Signer role"] == "Radiologist"
    assert "model=google/medgemma-4b-it" in texts["Provenance"] and "synthetic=True" in texts["Provenance"]
    names = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in content_items(sr, None)}
    assert names["Device Observer Manufacturer"].TextValue == "medgemma-edge"
    assert names["Device Observer Model Name"].TextValue == PROVENANCE["model"]
    assert names["Algorithm Name"].TextValue == PROVENANCE["model"]
    assert names["Algorithm Version"].TextValue == PROVENANCE["runtime_version"]
    assert "CurrentRequestedProcedureEvidenceSequence" not in sr and sr.PatientID == ""
    assert write_sr(r) == data  # a resend is the same document, byte for byte


def test_sr_of_a_received_study_references_it(store, received, tmp_path):
    studies, source = received
    r = signed_report(store, source=source)
    out = export_report(store, r["report_id"], "sr", studies=studies)
    assert (out.mime, out.filename) == ("application/dicom", f"{r['report_id']}-v1.dcm")
    dciodvfy(tmp_path, out.data)
    sr = pydicom.dcmread(io.BytesIO(out.data))
    ct = pydicom.dcmread(CT)
    assert sr.StudyInstanceUID == ct.StudyInstanceUID and sr.SeriesInstanceUID != ct.SeriesInstanceUID
    assert (sr.PatientID, str(sr.PatientName)) == (ct.PatientID, str(ct.PatientName))
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    ref = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert evidence.StudyInstanceUID == ct.StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.SeriesInstanceUID
    assert (ref.ReferencedSOPInstanceUID, ref.ReferencedSOPClassUID) == (ct.SOPInstanceUID, ct.SOPClassUID)
    (image,) = content_items(sr, codes.DCM.BestIllustrationOfFinding)
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ct.SOPInstanceUID
    assert sr.VerifyingObserverSequence[0].VerifyingObserverName == "Lovelace^Ada"
    assert [a["action"] for a in store.audit(r["report_id"])][-1] == "export"
    with pytest.raises(UsageError, match="needs that instance"):
        build_sr(r)  # a report on a study can't be exported without it
    other = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    with pytest.raises(UsageError, match="not the report's source instance"):
        build_sr(r, other)


def test_amendment_sr_names_its_predecessor(store):
    first = signed_report(store)
    rid = first["report_id"]
    store.amend(rid, final=final(impression="Amended."), reason="second read")
    store.sign(rid, version=2, signer="Grace Hopper", role="Radiologist")
    v1 = pydicom.dcmread(io.BytesIO(export_report(store, rid, "sr", version=1).data))
    v2 = pydicom.dcmread(io.BytesIO(export_report(store, rid, "sr").data))
    assert (v1.StudyInstanceUID, v1.SeriesInstanceUID) == (v2.StudyInstanceUID, v2.SeriesInstanceUID)
    assert (v1.InstanceNumber, v2.InstanceNumber) == (1, 2)
    pre = v2.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert pre.ReferencedSOPInstanceUID == first["sr_sop_instance_uid"] == v1.SOPInstanceUID


def test_fhir_bundle_round_trips(store, received):
    from fhir.resources.R4B.bundle import Bundle

    studies, source = received
    r = signed_report(store, source=source)
    out = export_report(store, r["report_id"], "fhir", studies=studies)
    assert out.mime == "application/fhir+json"
    bundle = Bundle.model_validate_json(out.data)  # parses back with fhir.resources
    assert bundle.type == "collection"
    by_type: dict = {}
    for e in bundle.entry:
        by_type.setdefault(e.resource.get_resource_type(), []).append(e.resource)
    (dr,) = by_type["DiagnosticReport"]
    assert dr.status == "final" and dr.conclusion == "Right lower lobe pneumonia."
    assert dr.identifier[0].value == f"urn:oid:{r['sr_sop_instance_uid']}"
    assert dr.imagingStudy[0].identifier.value == f"urn:oid:{source['study_uid']}"
    assert len(dr.result) == len(by_type["Observation"]) == 3  # two findings + the recommendation
    assert [o.valueString for o in by_type["Observation"]][:2] == [f["finding"] for f in FINAL["findings"]]
    assert by_type["Observation"][0].bodySite.text == "right lower zone"
    assert by_type["Patient"][0].identifier[0].value == pydicom.dcmread(CT).PatientID
    (device,) = by_type["Device"]
    assert device.manufacturer == "medgemma-edge" and device.deviceName[0].name == PROVENANCE["model"]
    (prov,) = by_type["Provenance"]
    agents = {a.type.coding[0].code: a for a in prov.agent}
    assert (
        agents["attester"].role[0].text == "Radiologist"
        and agents["author"].who.reference == bundle.entry[1].fullUrl
    )
    assert by_type["Practitioner"][0].name[0].text == "Ada Lovelace"
    assert DISCLAIMER in dr.text.div

    t = build_fhir(r, bundle_type="transaction")
    Bundle.model_validate(t)
    requests = [e["request"] for e in t["entry"]]
    assert requests[0]["ifNoneExist"] == f"identifier=urn:dicom:uid|urn:oid:{r['sr_sop_instance_uid']}"
    assert build_fhir(r) == build_fhir(r)  # a resend carries the same ids


def rendered(tmp_path, pdf: bytes) -> tuple[np.ndarray, str]:
    path = tmp_path / "report.pdf"
    path.write_bytes(pdf)
    subprocess.run(
        ["pdftoppm", "-png", "-r", "60", str(path), str(tmp_path / "page")], check=True, timeout=60
    )
    pages = sorted(tmp_path.glob("page-*.png"))
    assert pages, "pdftoppm wrote no page"
    text = subprocess.run(
        ["pdftotext", str(path), "-"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return np.asarray(Image.open(pages[0]).convert("L")), " ".join(text.split())


def test_pdf_with_the_thumbnail_of_a_received_study(store, received, tmp_path):
    studies, source = received
    r = signed_report(store, source=source)
    out = export_report(store, r["report_id"], "pdf", studies=studies)
    page, text = rendered(tmp_path, out.data)
    assert "Right lower lobe pneumonia." in text and "Ada Lovelace, Radiologist" in text
    assert DISCLAIMER in text and "model=google/medgemma-4b-it" in text and "window C" in text
    assert page.min() < 60 and (page < 250).mean() > 0.02  # text and a CT thumbnail: far from blank
    assert build_pdf(r, None) != out.data  # the thumbnail is in it


def test_pdf_of_an_uploaded_image(store, tmp_path):
    from edge.media.images import load_image

    r = signed_report(store, signer="Grace Hopper", role="GP")
    png = io.BytesIO()
    Image.fromarray((np.indices((64, 96)).sum(0) % 256).astype(np.uint8)).save(png, format="PNG")
    pdf = build_pdf(r, load_image(png.getvalue()))
    page, text = rendered(tmp_path, pdf)
    assert (
        "Right lower lobe pneumonia." in text
        and "Grace Hopper, GP" in text
        and UPLOADED["image_sha256"] in text
    )
    assert page.std() > 5
    assert build_pdf(r, load_image(png.getvalue())) == pdf  # invariant: same report, same bytes


def test_no_export_of_a_draft(store):
    d = new_report(store)
    for make in (lambda: write_sr(d), lambda: build_fhir(d), lambda: build_pdf(d, None)):
        with pytest.raises(ConflictError, match="is a draft: sign it"):
            make()
    for fmt in ("sr", "fhir", "pdf"):
        with pytest.raises(ConflictError):
            export_report(store, d["report_id"], fmt)
    with pytest.raises(UsageError, match="format must be one of"):
        export_report(store, d["report_id"], "docx")
    assert [a["action"] for a in store.audit(d["report_id"])] == ["save"]  # nothing exported, nothing audited
    s = store.sign(d["report_id"], version=1, signer="Ada", role="Radiologist")
    assert person_name(s["signer"]["name"]) == "Ada^"
    assert json.loads(render(s, "fhir"))["type"] == "collection"
