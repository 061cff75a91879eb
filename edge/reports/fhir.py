"""A signed report as FHIR R4 JSON (``fhir.resources``), for a HIS (OpenMRS and most others).

fhir.resources 8.x has no plain R4 package: its ``fhir.resources.R4B`` models are used. R4B
changed nothing in the resources written here (DiagnosticReport, Observation, Device,
Practitioner, Patient, Provenance, Bundle) from R4, so the JSON is R4 JSON.

One Bundle (``collection`` by default, or ``transaction`` for a server that should file each
resource, each entry a conditional create on its identifier so a resend creates nothing new):

- ``DiagnosticReport``: status final, code LOINC 18748-4 "Diagnostic imaging study", conclusion
  = the impression, the findings and the recommendation as ``result`` Observations, the signer as
  ``resultsInterpreter``, the source study as ``imagingStudy`` (a logical reference by its DICOM
  Study Instance UID), identifier = the SR's SOP Instance UID (the same document in every
  format), the disclaimer and provenance in its narrative, the PDF as ``presentedForm`` when given;
- an ``Observation`` per finding (code DCM 121071 "Finding", value = the finding, ``bodySite``
  = its location, a component "Certainty of Finding" (DCM 111012)), one for the recommendation;
- ``Device``: the model (manufacturer "medgemma-edge", model name, versions: runtime, bundle,
  quantization, synthetic);
- ``Practitioner``: the signer; ``Patient`` only when given (a received study's patient);
- ``Provenance``: targets the report and observations, recorded = signed_at, agents = the signer
  (attester, with their role) and the device (author).

Ids are ``urn:uuid:`` URIs derived from the report id and version, so a resend is identical.
(R4's Provenance has no identifier: a resent ``transaction`` may file a second Provenance.)
"""

from __future__ import annotations

import base64
import html
import json
import uuid

from edge.errors import UsageError, require
from edge.reports.content import DISCLAIMER, finding_text
from edge.reports.sr import MANUFACTURER, require_signed

DCM = "http://dicom.nema.org/resources/ontology/DCM"
LOINC = "http://loinc.org"
DICOM_UID = "urn:dicom:uid"
REPORT_SYSTEM = "urn:medgemma-edge:report"
DEVICE_SYSTEM = "urn:medgemma-edge:model"  # one Device per model, bundle and quantization
PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
_NS = uuid.UUID("9f3c1a52-7e44-4b8e-8d3e-2b6a0c5f1d77")


def _code(system: str, code: str, display: str, text: str | None = None) -> dict:
    out: dict = {"coding": [{"system": system, "code": code, "display": display}]}
    if text:
        out["text"] = text
    return out


def _narrative(lines: list[str]) -> dict:
    body = "".join(f"<p>{html.escape(line)}</p>" for line in lines)
    return {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{body}</div>'}


def build_fhir(
    report: dict,
    *,
    bundle_type: str = "collection",
    patient: dict | None = None,
    pdf: bytes | None = None,
) -> dict:
    """The FHIR R4 Bundle of a signed report, as a JSON-ready dict, round-tripped through
    fhir.resources (its models parse it back, so what is returned is valid to them).

    Args:
        report: a signed REPORT.
        bundle_type: "collection" (a document to file) or "transaction" (each resource created on
            the server, conditionally on its identifier).
        patient: ``{"id", "name"}`` of a received study's patient, when known.
        pdf: the report's PDF, attached as ``presentedForm``.
    Raises:
        ConflictError: the report is not signed.
        UsageError: an unknown bundle type, or the resources don't validate (a bug, named).
    """
    require_signed(report)
    if bundle_type not in ("collection", "transaction"):
        raise UsageError(f"bundle_type must be collection or transaction, not {bundle_type!r:.20}")
    require("fhir.resources.R4B.bundle", "reports")
    from fhir.resources.R4B.bundle import Bundle

    rid, ver = report["report_id"], report["version"]
    final, prov, source, signer = report["final"], report["provenance"], report["source"], report["signer"]
    signed_at = report["signed_at"]

    def urn(*parts) -> str:
        return f"urn:uuid:{uuid.uuid5(_NS, '/'.join([rid, str(ver), *map(str, parts)]))}"

    def ident(*parts) -> dict:
        return {"system": REPORT_SYSTEM, "value": "/".join([rid, f"v{ver}", *map(str, parts)])}

    entries: list[tuple[str, dict]] = []
    device_url, person_url, report_url = urn("device"), urn("practitioner"), urn("report")
    versions = [{"type": {"text": "runtime"}, "value": str(prov.get("runtime_version") or "unknown")}]
    versions += [
        {"type": {"text": k}, "value": str(prov[k])} for k in ("bundle", "quantization") if prov.get(k)
    ]
    entries.append((device_url, {
        "resourceType": "Device",
        "identifier": [{"system": DEVICE_SYSTEM, "value": f"{prov['model']}|{prov.get('bundle')}|{prov.get('quantization')}"}],
        "manufacturer": MANUFACTURER,
        "deviceName": [{"name": str(prov["model"]), "type": "model-name"}],
        "version": versions,
        "note": [{"text": f"synthetic={prov.get('synthetic')}; {DISCLAIMER}"}],
    }))  # fmt: skip
    entries.append((person_url, {
        "resourceType": "Practitioner",
        "identifier": [ident("signer")],
        "name": [{"text": signer["name"]}],
    }))  # fmt: skip
    subject = None
    if patient and (patient.get("id") or patient.get("name")):
        patient_url = urn("patient")
        entries.append((patient_url, {
            "resourceType": "Patient",
            **({"identifier": [{"value": patient["id"]}]} if patient.get("id") else {}),
            **({"name": [{"text": str(patient["name"]).replace("^", " ").strip()}]} if patient.get("name") else {}),
        }))  # fmt: skip
        subject = {"reference": patient_url}

    observations: list[str] = []
    for i, f in enumerate(final["findings"]):
        url = urn("finding", i)
        obs = {
            "resourceType": "Observation",
            "identifier": [ident("finding", i)],
            "status": "final",
            "code": _code(DCM, "121071", "Finding"),
            "valueString": f["finding"],
            "issued": signed_at,
            "performer": [{"reference": person_url}],
            "device": {"reference": device_url},
            "component": [
                {"code": _code(DCM, "111012", "Certainty of Finding"), "valueString": f["certainty"]}
            ],
        }
        if f.get("location"):
            obs["bodySite"] = {"text": f["location"]}
        entries.append((url, obs))
        observations.append(url)
    if final.get("recommendation"):
        url = urn("recommendation")
        entries.append((url, {
            "resourceType": "Observation",
            "identifier": [ident("recommendation")],
            "status": "final",
            "code": _code(DCM, "121075", "Recommendation"),
            "valueString": final["recommendation"],
            "issued": signed_at,
            "performer": [{"reference": person_url}],
        }))  # fmt: skip
        observations.append(url)
    for _url, resource in entries:
        if resource["resourceType"] == "Observation" and subject:
            resource["subject"] = subject

    lines = [f"Modality: {final['modality']}"]
    lines += [f"Finding: {finding_text(f)}" for f in final["findings"]]
    lines += [f"Impression: {final['impression']}"]
    lines += [f"Recommendation: {final['recommendation']}"] if final.get("recommendation") else []
    lines += [f"Signed by {signer['name']} ({signer['role']}) at {signed_at}", DISCLAIMER]
    lines += ["Provenance: " + "; ".join(f"{k}={v}" for k, v in prov.items())]
    dr = {
        "resourceType": "DiagnosticReport",
        "text": _narrative(lines),
        "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{report['sr_sop_instance_uid']}"}, ident()],
        "status": "final",
        "code": _code(LOINC, "18748-4", "Diagnostic imaging study", final["modality"] or None),
        "effectiveDateTime": signed_at,
        "issued": signed_at,
        "resultsInterpreter": [{"reference": person_url}],
        "result": [{"reference": u} for u in observations],
        "conclusion": final["impression"],
    }
    if subject:
        dr["subject"] = subject
    if source.get("study_uid"):
        dr["imagingStudy"] = [
            {"identifier": {"system": DICOM_UID, "value": f"urn:oid:{source['study_uid']}"}}
        ]
    if pdf is not None:
        dr["presentedForm"] = [{
            "contentType": "application/pdf", "data": base64.b64encode(pdf).decode("ascii"),
            "title": f"report {rid} version {ver}", "creation": signed_at,
        }]  # fmt: skip
    entries.insert(0, (report_url, dr))

    if source.get("study_uid"):
        entity = {"identifier": {"system": DICOM_UID, "value": f"urn:oid:{source['study_uid']}"}}
    else:
        entity = {"identifier": {"system": "urn:medgemma-edge:image-sha256", "value": source["image_sha256"]}}
    entries.append((urn("provenance"), {
        "resourceType": "Provenance",
        "text": _narrative([DISCLAIMER]),
        "target": [{"reference": report_url}, *({"reference": u} for u in observations)],
        "recorded": signed_at,
        "activity": {"text": "AI draft reviewed, edited and signed by the clinician"},
        "agent": [
            {"type": _code(PARTICIPANT, "attester", "Attester"), "role": [{"text": signer["role"]}],
             "who": {"reference": person_url}},
            {"type": _code(PARTICIPANT, "author", "Author"), "who": {"reference": device_url}},
        ],
        "entity": [{"role": "source", "what": entity}],
    }))  # fmt: skip

    bundle = {
        "resourceType": "Bundle",
        "identifier": {"system": DICOM_UID, "value": f"urn:oid:{report['sr_sop_instance_uid']}"},
        "type": bundle_type,
        "timestamp": signed_at,
        "entry": [_entry(url, res, bundle_type) for url, res in entries],
    }
    try:
        parsed = Bundle.model_validate(bundle)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise UsageError(
            f"the FHIR bundle of report {rid} does not validate: {str(exc).splitlines()[0]}"
        ) from None
    return json.loads(parsed.model_dump_json())


def _entry(url: str, resource: dict, bundle_type: str) -> dict:
    entry = {"fullUrl": url, "resource": resource}
    if bundle_type == "transaction":
        request = {"method": "POST", "url": resource["resourceType"]}
        ids = resource.get("identifier")
        if ids:
            first = ids[0] if isinstance(ids, list) else ids
            request["ifNoneExist"] = f"identifier={first.get('system', '')}|{first['value']}"
        entry["request"] = request
    return entry


def fhir_json(report: dict, **options) -> bytes:
    """:func:`build_fhir` as UTF-8 JSON bytes (what is exported and POSTed)."""
    return json.dumps(build_fhir(report, **options), ensure_ascii=False, indent=2).encode("utf-8")
