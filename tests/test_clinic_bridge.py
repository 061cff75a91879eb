"""The bridge's clinic side: study image sources, the report ops, and what serve starts around
them (the DICOM node, the outbox, the ingest rules), through the protocol as an app sees it.

The stores themselves are tested in test_studies.py / test_reports.py, the DICOM node against
dcmtk in test_dicom_node.py, the page in test_web_clinic.py.
"""

from __future__ import annotations

import base64
import socket
import threading
import time

import pydicom
import pytest
from conftest import run_cli
from fixtures_bridge import PYDICOM_SAMPLES
from fixtures_dicom import storescu

from android_bridge.bridge import Bridge, bridge_for, call
from android_bridge.runtime import Runtime
from android_bridge.settings import DicomSettings, ServeSettings
from edge.reports.store import ReportStore
from edge.studies.store import StudyStore

CT = PYDICOM_SAMPLES / "CT_small.dcm"
CT_DS = pydicom.dcmread(CT, stop_before_pixels=True)
FINAL = {
    "modality": "CT",
    "findings": [{"finding": "No acute abnormality", "location": "head", "certainty": "probable"}],
    "impression": "Normal sample slice.",
    "recommendation": "None.",
    "needs_review": True,
}


def rpc(bridge, op: str, **params) -> dict:
    """The op's result, or its error object (``{"code", "message"}``)."""
    replies = call(bridge, {"v": 1, "id": f"t-{op}", "op": op, "params": params})
    assert replies[-1]["type"] == "done"
    first = replies[-2]
    return first["result"] if first["type"] == "result" else first["error"]


@pytest.fixture
def stores(tmp_path):
    studies, reports = StudyStore(tmp_path / "studies"), ReportStore(tmp_path / "reports")
    studies.add_file(CT)
    yield studies, reports
    studies.close()
    reports.close()


@pytest.fixture
def clinic_bridge(stores, twin_bridge):
    """A bridge over the stores, sharing the twin bridge's loaded models (nothing loads again)."""
    studies, reports = stores
    rt = twin_bridge.runtime
    bridge = Bridge(
        Runtime(
            medgemma=rt.slots["medgemma"].model,
            encoder=rt.slots["medsiglip"].model,
            studies=studies,
            reports=reports,
        )
    )
    yield bridge


def test_study_sources_work_where_paths_are_refused(stores, twin_bridge):
    studies, _ = stores
    rt = twin_bridge.runtime
    bridge = Bridge(Runtime(encoder=rt.slots["medsiglip"].model, studies=studies), allow_paths=False)
    health = rpc(bridge, "health")
    assert "study" in health["capabilities"]["image_sources"]
    assert "path" not in health["capabilities"]["image_sources"]
    got = rpc(bridge, "classify", image={"study": CT_DS.StudyInstanceUID}, labels=["a", "b"])
    assert len(got["scores"]) == 2  # instance left out: the study's first displayable instance
    assert rpc(bridge, "classify", image={"path": str(CT)})["code"] == "invalid_request"


@pytest.mark.parametrize(
    "source, code",
    [
        ({"study": "1.2.3.999"}, "not_found"),
        ({"study": CT_DS.StudyInstanceUID, "instance": "1.2.3.999"}, "not_found"),
        ({"study": 5}, "invalid_request"),
        ({"study": "1" * 65}, "invalid_request"),
        ({"study": CT_DS.StudyInstanceUID, "frame": 7}, "invalid_request"),
    ],
)
def test_bad_study_sources_get_typed_errors(clinic_bridge, source, code):
    assert rpc(clinic_bridge, "preview_image", image=source)["code"] == code


def test_no_study_store_is_not_loaded(twin_bridge):
    bridge = Bridge(Runtime(encoder=twin_bridge.runtime.slots["medsiglip"].model))
    assert rpc(bridge, "list_studies")["code"] == "not_loaded"
    assert rpc(bridge, "classify", image={"study": "1.2.3"})["code"] == "not_loaded"
    assert rpc(bridge, "save_report", final=FINAL, source={"image_sha256": "0" * 64})["code"] == "not_loaded"


def test_a_report_from_draft_to_signed_export_and_amendment(clinic_bridge):
    b = clinic_bridge
    src = {"study_uid": CT_DS.StudyInstanceUID, "instance_uid": CT_DS.SOPInstanceUID}
    draft = {**FINAL, "impression": "AI: no abnormality."}
    saved = rpc(b, "save_report", draft=draft, final=FINAL, source=src)
    rid = saved["report_id"]
    assert saved["status"] == "draft" and saved["draft"] == draft and saved["final"] == FINAL
    assert saved["source"]["series_uid"] == CT_DS.SeriesInstanceUID  # filled in from the store
    prov = saved["provenance"]
    assert prov["synthetic"] is True and prov["runtime_version"] and prov["quantization"] == "Q8_0"
    assert rpc(b, "export_report", report_id=rid, format="sr")["code"] == "conflict"  # a draft
    signed = rpc(b, "sign_report", report_id=rid, version=1, signer="Dr A", role="radiologist")
    assert signed["status"] == "signed" and signed["signer"] == {"name": "Dr A", "role": "radiologist"}
    # a signed version can't change through any op
    assert rpc(b, "sign_report", report_id=rid, version=1, signer="Dr B", role="x")["code"] == "conflict"
    assert rpc(b, "save_report", report_id=rid, final=FINAL, source=src)["code"] == "conflict"
    sr = rpc(b, "export_report", report_id=rid, format="sr")
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(base64.b64decode(sr["base64"])))
    assert ds.SOPInstanceUID == signed["sr_sop_instance_uid"] and ds.VerificationFlag == "VERIFIED"
    assert ds.StudyInstanceUID == CT_DS.StudyInstanceUID  # the SR belongs to the source study
    assert sr["mime"] == "application/dicom" and sr["filename"].endswith(".dcm")
    pdf = rpc(b, "export_report", report_id=rid, format="pdf")
    assert base64.b64decode(pdf["base64"]).startswith(b"%PDF-")
    fhir = rpc(b, "export_report", report_id=rid, format="fhir")
    assert b'"DiagnosticReport"' in base64.b64decode(fhir["base64"])
    amended = rpc(b, "amend_report", report_id=rid, final={**FINAL, "impression": "Amended."}, reason="typo")
    assert amended["version"] == 2 and amended["replaces"] == 1 and amended["status"] == "draft"
    got = rpc(b, "get_report", report_id=rid, version=1)
    assert got["status"] == "signed" and got["final"] == FINAL  # the signed version is kept as it was
    actions = [a["action"] for a in got["audit"]]
    assert actions[:2] == ["save", "sign"] and "amend" in actions and actions.count("export") == 3
    listed = rpc(b, "list_reports", study=CT_DS.StudyInstanceUID)
    assert listed["total"] == 1 and listed["reports"][0]["report_id"] == rid


def test_send_report_queues_for_a_named_or_configured_destination(clinic_bridge):
    b = clinic_bridge
    saved = rpc(b, "save_report", final=FINAL, source={"image_sha256": "ab" * 32})
    rpc(b, "sign_report", report_id=saved["report_id"], version=1, signer="Dr A", role="GP")
    assert rpc(b, "send_report", report_id=saved["report_id"])["code"] == "invalid_request"  # none set
    with socket.socket() as s:  # a port nothing listens on: the PACS is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = {"kind": "dicom", "host": "127.0.0.1", "port": port, "ae_title": "PACS"}
    item = rpc(b, "send_report", report_id=saved["report_id"], destination=dest)
    assert item["state"] == "queued" and item["report_id"] == saved["report_id"]
    again = rpc(b, "send_report", report_id=saved["report_id"], destination=dest)
    assert again["item_id"] == item["item_id"]  # not queued twice
    assert [i["item_id"] for i in rpc(b, "outbox")["items"]] == [item["item_id"]]
    bad = rpc(b, "send_report", report_id=saved["report_id"], destination={"kind": "ftp"})
    assert bad["code"] == "invalid_request"


def test_serve_settings_start_the_node_and_the_outbox_and_shutdown_stops_them(tmp_path, twin_llm_bundle):
    settings = ServeSettings(
        bundle=twin_llm_bundle, data_dir=tmp_path / "data", dicom=DicomSettings(port=0), preload=()
    )
    bridge = bridge_for(settings)
    try:
        node = bridge.dicom
        assert node["port"] > 0 and node["host"] == "127.0.0.1" and node["ae_title"] == "MEDGEMMA"
        assert rpc(bridge, "health")["capabilities"]["dicom"] == node
        assert bridge.deliverer is not None
        assert all(r.returncode == 0 for r in storescu(node["port"], CT))
        assert rpc(bridge, "list_studies")["total"] == 1
    finally:
        bridge.shutdown(grace_s=2)
    with pytest.raises(ConnectionRefusedError):  # the node stopped listening
        socket.create_connection(("127.0.0.1", node["port"]), timeout=5).close()


def test_index_received_adds_each_received_image(tmp_path, twin_llm_bundle, medsiglip_bundle):
    settings = ServeSettings(
        bundle=twin_llm_bundle,
        medsiglip_bundle=medsiglip_bundle,
        index=tmp_path / "index",
        data_dir=tmp_path / "data",
        dicom=DicomSettings(port=0),
        index_received=True,
        preload=("medsiglip",),
    )
    bridge = bridge_for(settings)
    try:
        deadline = time.monotonic() + 60
        while bridge.runtime.slots["medsiglip"].model is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(
            r.returncode == 0 for r in storescu(bridge.dicom["port"], CT, PYDICOM_SAMPLES / "MR_small.dcm")
        )
        while time.monotonic() < deadline:
            index = bridge.runtime.index
            if index is not None and index.count() == 2:
                break
            time.sleep(0.2)
        assert bridge.runtime.index.count() == 2
        hits = rpc(bridge, "search_similar", image={"study": CT_DS.StudyInstanceUID}, k=2)["matches"]
        assert hits[0]["metadata"]["modality"] == "CT" and hits[0]["metadata"]["source"] == "dicom"
        assert {h["metadata"]["modality"] for h in hits} == {"CT", "MR"}
    finally:
        bridge.shutdown(grace_s=2)


class Preparing:
    """A MedGemma stand-in whose prepare_image takes a while and honours cancel."""

    def __init__(self):
        self.prepared: list = []
        self.cancelled = threading.Event()
        self.info = {}

    def prepare_image(self, image, *, cancel=None, wait=True, prefill=True, progress=None):
        for _ in range(200):
            if cancel is not None and cancel.is_set():
                self.cancelled.set()
                return {"cached": False, "encode_s": 0.0}
            time.sleep(0.01)
        self.prepared.append(image.size)
        return {"cached": False, "encode_s": 2.0}


def test_prepare_received_encodes_while_idle_and_yields_to_a_request(tmp_path, monkeypatch):
    from android_bridge import clinic

    monkeypatch.setattr(clinic, "IDLE_S", 0.2)
    model = Preparing()
    studies = StudyStore(tmp_path / "studies")
    bridge = Bridge(Runtime(medgemma=model, studies=studies))
    worker = clinic.ReceivedWorker(bridge, index=False, prepare=True)
    worker.start()
    try:
        worker.received(studies.add_file(CT))
        deadline = time.monotonic() + 20
        while not model.prepared and time.monotonic() < deadline:
            time.sleep(0.05)
        assert model.prepared == [(128, 128)]  # encoded once the bridge had been idle
        worker.received(studies.add_file(PYDICOM_SAMPLES / "MR_small.dcm"))
        while not bridge.idle_cancels and time.monotonic() < deadline:
            time.sleep(0.01)
        bridge._yield_idle_work()  # what a generate does first
        assert model.cancelled.is_set() and not bridge.idle_cancels
    finally:
        worker.stop()
        studies.close()


def test_serve_refuses_contradicting_clinic_flags(twin_llm_bundle):
    r = run_cli("serve", "-b", str(twin_llm_bundle), "--index-received", "--dicom-port", "0")
    assert r.returncode == 2 and "--index" in r.stderr
    r = run_cli("serve", "-b", str(twin_llm_bundle), "--no-data", "--dicom-port", "0")
    assert r.returncode == 2 and "--no-data" in r.stderr
    r = run_cli("serve", "-b", str(twin_llm_bundle), "--pacs", "nohost")
    assert r.returncode == 2 and "PORT" in r.stderr


def test_the_pdf_of_an_uploaded_image_shows_it_once_its_hash_matches(clinic_bridge):
    import hashlib

    from fixtures_bridge import IMAGE_PNG

    sha = hashlib.sha256(IMAGE_PNG).hexdigest()
    b = clinic_bridge
    saved = rpc(b, "save_report", final=FINAL, source={"image_sha256": sha})
    rpc(b, "sign_report", report_id=saved["report_id"], version=1, signer="Dr A", role="GP")
    plain = rpc(b, "export_report", report_id=saved["report_id"], format="pdf")
    inline = {"base64": base64.b64encode(IMAGE_PNG).decode()}
    shown = rpc(b, "export_report", report_id=saved["report_id"], format="pdf", image=inline)
    assert shown["bytes"] > plain["bytes"]  # the thumbnail is in
    other = {"base64": base64.b64encode(IMAGE_PNG + b"x").decode()}
    wrong = rpc(b, "export_report", report_id=saved["report_id"], format="pdf", image=other)
    assert wrong["code"] == "invalid_request" and "not the one" in wrong["message"]


def test_a_report_without_a_medgemma_bundle_says_so_in_its_provenance(tmp_path):
    reports = ReportStore(tmp_path / "reports")
    try:
        bridge = Bridge(Runtime(reports=reports))
        saved = rpc(bridge, "save_report", final=FINAL, source={"image_sha256": "cd" * 32})
        assert saved["provenance"]["model"].startswith("none") and saved["provenance"]["synthetic"] is False
    finally:
        reports.close()
