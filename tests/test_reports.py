"""The report store (edge.reports.store): draft -> edit -> sign -> amend, immutability of signed
versions through every path (code and SQLite triggers), the audit log, validation, and the
``report`` CLI verbs that only read or export."""

from __future__ import annotations

import copy
import json
import sqlite3

import pytest

from edge.errors import ConflictError, NotFoundError, UsageError
from edge.reports.store import DB_NAME, ReportStore

FINAL = {
    "modality": "chest X-ray",
    "findings": [
        {
            "finding": "right lower lobe consolidation",
            "location": "right lower zone",
            "certainty": "probable",
        },
        {"finding": "pleural effusion", "certainty": "absent"},
    ],
    "impression": "Findings consistent with right lower lobe pneumonia.",
    "recommendation": "Clinical correlation; follow-up radiograph in 6 weeks.",
    "needs_review": True,
}
PROVENANCE = {
    "model": "google/medgemma-4b-it",
    "bundle": "demo",
    "quantization": "Q4_K_M",
    "synthetic": True,
    "runtime_version": "0.1.0",
}
IMAGE_SHA = "ab" * 32
UPLOADED = {"image_sha256": IMAGE_SHA}


def final(**changes) -> dict:
    out = copy.deepcopy(FINAL)
    out.update(changes)
    return out


def new_report(store: ReportStore, *, source=UPLOADED, draft=None, body=None) -> dict:
    return store.save(
        report_id=None, draft=draft or final(), final=body or final(), source=source, provenance=PROVENANCE
    )


def signed_report(store: ReportStore, *, source=UPLOADED, signer="Ada Lovelace", role="Radiologist") -> dict:
    """A report drafted, edited once and signed (the flow of the page)."""
    r = new_report(store, source=source)
    r = store.save(
        report_id=r["report_id"], draft=None, final=final(impression="Right lower lobe pneumonia."),
        source=source, provenance=PROVENANCE,
    )  # fmt: skip
    return store.sign(r["report_id"], version=r["version"], signer=signer, role=role)


@pytest.fixture
def store(tmp_path):
    s = ReportStore(tmp_path / "reports")
    yield s
    s.close()


def test_draft_edit_sign(store):
    ai = final(impression="AI text", extra_field_from_model="kept verbatim")  # off-schema draft: kept as is
    r = store.save(report_id=None, draft=ai, final=final(), source=UPLOADED, provenance=PROVENANCE)
    assert (r["version"], r["status"], r["replaces"], r["signer"], r["sr_sop_instance_uid"]) == (
        1,
        "draft",
        None,
        None,
        None,
    )
    assert r["draft"] == ai and r["final"] == FINAL and r["provenance"] == PROVENANCE and r["delivery"] == []

    edited = store.save(report_id=r["report_id"], draft=None, final=final(impression="Edited."), source=UPLOADED,
                        provenance=PROVENANCE)  # fmt: skip
    assert edited["version"] == 1 and edited["final"]["impression"] == "Edited." and edited["draft"] == ai

    s = store.sign(r["report_id"], version=1, signer="  Ada   Lovelace ", role="Radiologist")
    assert s["status"] == "signed" and s["signer"] == {"name": "Ada Lovelace", "role": "Radiologist"}
    assert s["signed_at"].endswith("Z") and s["sr_sop_instance_uid"].startswith("2.25.")
    assert store.get(r["report_id"]) == s


def test_signed_is_immutable_through_every_path(store, tmp_path):
    s = signed_report(store)
    rid = s["report_id"]
    with pytest.raises(ConflictError, match="already signed.*amend"):
        store.sign(rid, version=1, signer="Someone Else", role="Radiologist")
    with pytest.raises(ConflictError, match="signed and can't be changed; amend"):
        store.save(
            report_id=rid, draft=None, final=final(impression="x"), source=UPLOADED, provenance=PROVENANCE
        )
    assert store.get(rid, 1) == s

    # the database itself refuses, whatever connection writes: triggers, not only code
    raw = sqlite3.connect(tmp_path / "reports" / DB_NAME)
    for sql in ("UPDATE versions SET final = '{}'", "UPDATE versions SET signer_name = 'Mallory'",
                "DELETE FROM versions", "UPDATE audit SET actor = 'Mallory'", "DELETE FROM audit"):  # fmt: skip
        with pytest.raises(sqlite3.IntegrityError, match="immutable|append-only"):
            raw.execute(sql)
    raw.close()
    # the store's own transaction maps the trigger's abort to a ConflictError
    with pytest.raises(ConflictError, match="immutable"), store.transaction() as c:
        c.execute("UPDATE versions SET final = '{}' WHERE report_id = ?", (rid,))
    assert store.get(rid, 1) == s


def test_amend_keeps_both_versions_and_audits_both(store):
    s = signed_report(store)
    rid = s["report_id"]
    a = store.amend(
        rid, final=final(impression="Amended: no consolidation."), reason="second read", actor="Ada"
    )
    assert (a["version"], a["status"], a["replaces"], a["reason"]) == (2, "draft", 1, "second read")
    assert a["draft"] == s["draft"] and a["source"] == s["source"] and a["sr_sop_instance_uid"] is None
    with pytest.raises(ConflictError, match="is a draft: save"):
        store.amend(rid, final=final(), reason="again")
    a2 = store.sign(rid, version=2, signer="Grace Hopper", role="Consultant radiologist")
    assert a2["sr_sop_instance_uid"] != s["sr_sop_instance_uid"]
    assert store.get(rid, 1) == s and store.get(rid)["version"] == 2
    audit = store.audit(rid)
    assert [(e["action"], e["version"]) for e in audit] == [
        ("save", 1), ("save", 1), ("sign", 1), ("amend", 2), ("sign", 2)
    ]  # fmt: skip
    assert audit[2]["actor"] == "Ada Lovelace" and audit[4]["actor"] == "Grace Hopper"
    assert "replaces version 1" in audit[3]["detail"] and "second read" in audit[3]["detail"]
    assert all(e["time"].endswith("Z") for e in audit)


@pytest.mark.parametrize(
    "body, message",
    [
        ({k: v for k, v in FINAL.items() if k != "impression"}, "needs the field 'impression'"),
        (final(impression="   "), "impression can't be empty"),
        (final(findings=[{"finding": "x", "certainty": "maybe"}]), r"findings\[0\].certainty must be one of"),
        (final(findings=[{"finding": "x", "certainty": "definite"}] * 9), "at most 8 items"),
        (final(colour="blue"), "unknown field 'colour'"),
        (final(needs_review="yes"), "needs_review must be a boolean"),
        (final(impression="x" * 5000), "at most 4000 characters"),
        ("not an object", "final must be an object"),
    ],
)
def test_final_is_checked_against_the_report_schema(store, body, message):
    with pytest.raises(UsageError, match=message):
        store.save(report_id=None, draft=None, final=body, source=UPLOADED, provenance=PROVENANCE)


@pytest.mark.parametrize(
    "source, provenance, message",
    [
        ({}, PROVENANCE, "needs study_uid .* or image_sha256"),
        ({"image_sha256": "XYZ"}, PROVENANCE, "64 lowercase hex"),
        ({"study_uid": "1.2.abc"}, PROVENANCE, "must be a DICOM UID"),
        ({"instance_uid": "1.2.3", "image_sha256": IMAGE_SHA}, PROVENANCE, "needs source.study_uid"),
        ({"image_sha256": IMAGE_SHA, "path": "/etc/passwd"}, PROVENANCE, "unknown field 'path'"),
        (UPLOADED, {**PROVENANCE, "model": ""}, "provenance.model must name the model"),
        (UPLOADED, {**PROVENANCE, "synthetic": "no"}, "synthetic must be true or false"),
        (UPLOADED, {**PROVENANCE, "weights": [1, 2]}, "must be a string, a number"),
    ],
)
def test_source_and_provenance_are_checked(store, source, provenance, message):
    with pytest.raises(UsageError, match=message):
        store.save(report_id=None, draft=None, final=final(), source=source, provenance=provenance)


@pytest.mark.parametrize(
    "signer, role, message",
    [("", "Radiologist", "signer name is required"), ("Ada", "  ", "signer role is required"),
     ("A" * 65, "Radiologist", "at most 64 characters"), ("Ada\x07", "Radiologist", "control characters")],
)  # fmt: skip
def test_signer_name_and_role_are_required_and_bounded(store, signer, role, message):
    r = new_report(store)
    with pytest.raises(UsageError, match=message):
        store.sign(r["report_id"], version=1, signer=signer, role=role)
    assert store.get(r["report_id"])["status"] == "draft"


def test_unknown_reports_and_versions(store):
    with pytest.raises(NotFoundError, match="no report rpt-0"):
        store.get("rpt-0")
    with pytest.raises(NotFoundError, match="report ids are"):
        store.get("../../etc")
    r = new_report(store)
    with pytest.raises(NotFoundError, match="has no version 3 .versions 1 to 1"):
        store.sign(r["report_id"], version=3, signer="Ada", role="Radiologist")
    with pytest.raises(NotFoundError):
        store.save(report_id="rpt-missing", draft=None, final=final(), source=UPLOADED, provenance=PROVENANCE)
    with pytest.raises(NotFoundError):
        store.audit("rpt-missing")


def test_list_filters_and_pages(store):
    study = {"study_uid": "1.2.826.0.1.3680043.8.498.1", "instance_uid": "1.2.826.0.1.3680043.8.498.2"}
    on_study = signed_report(store, source=study)
    drafts = [new_report(store) for _ in range(3)]
    everything = store.list()
    assert everything["total"] == 4 and everything["reports"][0]["report_id"] == drafts[-1]["report_id"]
    assert [r["report_id"] for r in store.list(study_uid=study["study_uid"])["reports"]] == [
        on_study["report_id"]
    ]
    assert store.list(image_sha256=IMAGE_SHA)["total"] == 3
    assert store.list(status="signed")["total"] == 1 and store.list(status="draft")["total"] == 3
    page = store.list(offset=1, limit=2)
    assert page["total"] == 4 and len(page["reports"]) == 2
    store.amend(on_study["report_id"], final=final(), reason="typo")
    listed = store.list(study_uid=study["study_uid"])["reports"]
    assert len(listed) == 1 and listed[0]["version"] == 2  # one entry per report: its latest version
    for bad in ({"limit": 0}, {"limit": 201}, {"offset": -1}, {"status": "final"}):
        with pytest.raises(UsageError):
            store.list(**bad)


def test_reports_survive_a_restart(tmp_path):
    with ReportStore(tmp_path / "r") as s:
        signed = signed_report(s)
        s.amend(signed["report_id"], final=final(), reason="r")
    with ReportStore(tmp_path / "r") as s:
        assert s.get(signed["report_id"], 1) == signed
        assert s.get(signed["report_id"])["version"] == 2
        assert len(s.audit(signed["report_id"])) == 4


# --- CLI --------------------------------------------------------------------------------------


def cli(capsys, *args: str) -> tuple[int, str, str]:
    from medgemma_edge.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_list_show_export(tmp_path, capsys):
    with ReportStore(tmp_path / "reports") as s:
        signed = signed_report(s)
        draft = new_report(s)
    data = str(tmp_path)
    code, out, _ = cli(capsys, "report", "list", "--data", data, "--json")
    assert code == 0 and json.loads(out)["total"] == 2
    code, out, _ = cli(capsys, "report", "list", "--data", data, "--status", "signed")
    assert (
        code == 0 and signed["report_id"] in out and "Ada Lovelace" in out and draft["report_id"] not in out
    )
    code, out, _ = cli(capsys, "report", "show", signed["report_id"], "--data", data, "--json")
    assert code == 0 and [a["action"] for a in json.loads(out)["audit"]] == ["save", "save", "sign"]

    target = tmp_path / "out.fhir.json"
    code, out, _ = cli(
        capsys,
        "report",
        "export",
        signed["report_id"],
        "--format",
        "fhir",
        "--out",
        str(target),
        "--data",
        data,
    )
    assert code == 0 and json.loads(target.read_text())["resourceType"] == "Bundle"
    before = target.read_bytes()
    code, _, err = cli(
        capsys,
        "report",
        "export",
        signed["report_id"],
        "--format",
        "pdf",
        "--out",
        str(target),
        "--data",
        data,
    )
    assert code == 2 and "exists" in err and "--force" in err and target.read_bytes() == before
    code, _, _ = cli(capsys, "report", "export", signed["report_id"], "--format", "pdf", "--out", str(target),
                     "--data", data, "--force")  # fmt: skip
    assert code == 0 and target.read_bytes().startswith(b"%PDF")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp litter

    code, _, err = cli(capsys, "report", "export", draft["report_id"], "--format", "sr", "--out", str(tmp_path / "d.dcm"),
                       "--data", data)  # fmt: skip
    assert code == 3 and "is a draft: sign it" in err and not (tmp_path / "d.dcm").exists()
    code, _, err = cli(capsys, "report", "show", "rpt-nope", "--data", data)
    assert code == 3 and "no report rpt-nope" in err
