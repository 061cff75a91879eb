"""The clinic step of ``make demo``: DICOM in, a question about a received study, a signed
report out, delivered to a PACS.

Two DICOM nodes run on this machine for the demo, each on loopback and a free port: the
runtime's own (its study store under ``root/clinic/data``) and a second one standing in for the
clinic's PACS (under ``root/clinic/pacs``). A pynetdicom SCU (what a modality is) pushes pydicom's
sample CT and MR to the runtime's node; the runtime lists them and MedGemma answers a question
about the CT through the bridge (an image source ``{"study", "instance"}``); a structured report
is drafted with the report schema, edited, signed, exported as DICOM SR, FHIR R4 and PDF (files
under ``root/clinic/exports``), queued for the PACS and delivered by the outbox. Every call goes
through the bridge protocol, as an app's would.
"""

from __future__ import annotations

import base64
import shutil
import time
from pathlib import Path

from edge.errors import EdgeError, require

SAMPLES = ("CT_small.dcm", "MR_small.dcm")
SIGNER = ("Demo Clinician", "radiologist")


def _send(node_port: int, files: list[Path]) -> int:
    """C-STORE ``files`` to the node on ``node_port`` as a modality would (one association)."""
    pydicom = require("pydicom", "dicom")
    pynetdicom = require("pynetdicom", "dicom")
    ae = pynetdicom.AE(ae_title="DEMO-MODALITY")
    datasets = [pydicom.dcmread(f) for f in files]
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node_port, ae_title="MEDGEMMA")
    if not assoc.is_established:
        raise EdgeError("demo: the DICOM node refused the association")
    try:
        return sum(int(getattr(assoc.send_c_store(ds), "Status", -1) == 0) for ds in datasets)
    finally:
        assoc.release()


class Pacs:
    """A stand-in for the clinic's PACS: a pynetdicom Storage SCP on a free loopback port that
    accepts every storage class (the SR included) and keeps the SOP Instance UIDs it received."""

    def __init__(self, ae_title: str = "DEMO-PACS"):
        pynetdicom = require("pynetdicom", "dicom")
        self.received: list[str] = []
        ae = pynetdicom.AE(ae_title=ae_title)
        ae.supported_contexts = pynetdicom.AllStoragePresentationContexts

        def on_store(event):
            self.received.append(str(event.dataset.SOPInstanceUID))
            return 0x0000

        self.server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(pynetdicom.evt.EVT_C_STORE, on_store)]
        )
        self.port = self.server.server_address[1]

    def stop(self) -> None:
        self.server.shutdown()


def _ok(replies: list[dict]) -> dict:
    for r in replies:
        if r["type"] == "error":
            raise EdgeError(f"demo: {r['error']['code']}: {r['error']['message']}")
    return next(r["result"] for r in replies if r["type"] == "result")


def demo_clinic(root: Path, bundle: Path, *, threads: int | None = None) -> dict:
    """Run the clinic flow once (fresh data each run); returns what the demo prints."""
    import pydicom.data

    from android_bridge.bridge import bridge_for, call
    from android_bridge.settings import DicomSettings, ServeSettings
    from edge.medgemma.generation import builtin_schema
    from edge.medgemma.settings import MedGemmaSettings

    base = root / "clinic"
    shutil.rmtree(base, ignore_errors=True)  # a fresh clinic day every run
    pacs = Pacs()
    # what `serve -b BUNDLE --data DIR --dicom-port 0` builds: the stores, the DICOM node, the outbox
    bridge = bridge_for(
        ServeSettings(
            bundle=bundle,
            data_dir=base / "data",
            dicom=DicomSettings(port=0),
            medgemma=MedGemmaSettings(n_ctx=1024, n_threads=threads),
            preload=(),
        )
    )
    runtime = bridge.runtime
    try:
        samples = [Path(pydicom.data.get_testdata_file(name)) for name in SAMPLES]
        t0 = time.perf_counter()
        stored = _send(bridge.dicom["port"], samples)
        receive_s = time.perf_counter() - t0
        listed = _ok(call(bridge, {"v": 1, "id": "d-list", "op": "list_studies"}))
        ct = next(s for s in listed["studies"] if "CT" in s["modalities"])
        study = _ok(
            call(bridge, {"v": 1, "id": "d-study", "op": "get_study", "params": {"study": ct["study_uid"]}})
        )
        instance = study["series"][0]["instances"][0]["sop_instance_uid"]
        source = {"study": ct["study_uid"], "instance": instance}
        runtime.load("medgemma")
        answer = _ok(
            call(
                bridge,
                {
                    "v": 1,
                    "id": "d-ask",
                    "op": "generate",
                    "params": {"prompt": "Describe this CT image.", "images": [source], "max_tokens": 16},
                },
            )
        )
        drafted = _ok(
            call(
                bridge,
                {
                    "v": 1,
                    "id": "d-draft",
                    "op": "generate",
                    "params": {
                        "prompt": "Draft a structured report of this image.",
                        "images": [source],
                        "schema": builtin_schema("report"),
                        "max_tokens": 256,
                    },
                },
            )
        )
        draft = drafted.get("parsed") if isinstance(drafted.get("parsed"), dict) else None
        final = {  # what the clinician writes after reading the draft (the twin's is random text)
            "modality": "CT",
            "findings": [
                {"finding": "No acute intracranial abnormality", "location": "head", "certainty": "probable"}
            ],
            "impression": "No acute abnormality on this sample CT slice.",
            "recommendation": "Clinical correlation.",
            "needs_review": True,
        }
        src = {"study_uid": ct["study_uid"], "instance_uid": instance}
        params = {"final": final, "source": src} | ({"draft": draft} if draft else {})
        saved = _ok(call(bridge, {"v": 1, "id": "d-save", "op": "save_report", "params": params}))
        rid = saved["report_id"]
        signed = _ok(
            call(
                bridge,
                {
                    "v": 1,
                    "id": "d-sign",
                    "op": "sign_report",
                    "params": {
                        "report_id": rid,
                        "version": saved["version"],
                        "signer": SIGNER[0],
                        "role": SIGNER[1],
                    },
                },
            )
        )
        exports = {}
        out_dir = base / "exports"
        out_dir.mkdir(parents=True, exist_ok=True)
        for fmt in ("sr", "fhir", "pdf"):
            got = _ok(
                call(
                    bridge,
                    {
                        "v": 1,
                        "id": f"d-x-{fmt}",
                        "op": "export_report",
                        "params": {"report_id": rid, "format": fmt},
                    },
                )
            )
            path = out_dir / got["filename"]
            path.write_bytes(base64.b64decode(got["base64"]))
            exports[fmt] = (path, got["bytes"])
        destination = {"kind": "dicom", "host": "127.0.0.1", "port": pacs.port, "ae_title": "DEMO-PACS"}
        call(
            bridge,
            {
                "v": 1,
                "id": "d-send",
                "op": "send_report",
                "params": {"report_id": rid, "destination": destination},
            },
        )
        deadline = time.monotonic() + 30
        item = None
        while time.monotonic() < deadline:
            item = _ok(call(bridge, {"v": 1, "id": "d-outbox", "op": "outbox"}))["items"][-1]
            if item["state"] != "queued":
                break
            time.sleep(0.2)
        return {
            "received": stored,
            "receive_s": receive_s,
            "studies": listed["total"],
            "answer": answer["text"].strip(),
            "draft_ok": draft is not None,
            "report_id": rid,
            "signed_at": signed["signed_at"],
            "exports": exports,
            "delivery": item["state"] if item else "unknown",
            "attempts": item["attempts"] if item else 0,
            "pacs_instances": len(pacs.received),
            "pacs_has_sr": signed["sr_sop_instance_uid"] in pacs.received,
            "node_port": bridge.dicom["port"],
            "pacs_port": pacs.port,
        }
    finally:
        bridge.shutdown(grace_s=5)  # stops the DICOM node and the outbox (its shutdown hooks)
        runtime.close()
        pacs.stop()
        for store in (runtime.studies, runtime.reports):
            store.close()
