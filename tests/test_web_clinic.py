"""The clinic in the page, end to end in headless Chromium: received studies and report sign-off.

A real server on port 0 holds a study store and a report store; a DICOM node on the same study
store receives what dcmtk's ``storescu`` pushes. The page must show the pushed study without a
reload, open it (the preview the models see), answer a question about it as a stream, and take
a report through save → diff → sign → read-only → export → send (to a PACS that is down: the
report waits in the outbox) → amend (version 2). The browser setup is tests/test_web_page.py's.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from fixtures_bridge import IMAGE_PNG, HTTPClient, make_bridge, start_server
from test_web_page import (  # the browser fixture and helpers, not its tests
    ARTIFACTS,
    Paced,
    assert_only_the_server,
    browser,  # noqa: F401 (a fixture)
    low_contrast,
    open_page,
    wait_ready,
)

from edge.medgemma.generation import Piece

DRAFT = {  # what the model "drafts": a fixed report, so the diff and the checks are exact
    "modality": "CT",
    "findings": [{"finding": "No focal lesion", "location": "liver", "certainty": "probable"}],
    "impression": "No acute abnormality.",
    "recommendation": "",
    "needs_review": True,
}
AE_TITLE = "MEDGEMMA"


class Drafting(Paced):
    """The paced twin, except that a schema-constrained answer (the structured report) is
    ``DRAFT`` — after the image went through the real model, so the request is otherwise real."""

    def stream(self, messages, *, options=None, **kwargs):
        if options is None or options.schema is None:
            yield from super().stream(messages, options=options, **kwargs)
            return
        short = dataclasses.replace(options, max_tokens=2, schema=None)
        last = None
        for last in self._model.stream(messages, options=short, **kwargs):  # noqa: B007 (the last)
            pass
        text = json.dumps(DRAFT)
        for i in range(0, len(text), 24):
            yield Piece(text[i : i + 24], i // 24 + 1)
        yield dataclasses.replace(last, text="", parsed=DRAFT, schema_errors=[], finish_reason="stop")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sample(name: str) -> Path:
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files" / name


def _ct() -> Path:
    return _sample("CT_small.dcm")


@pytest.fixture(scope="module")
def clinic(twin_bridge, twin_model, twin_llm_bundle, medsiglip_bundle, tmp_path_factory):
    from android_bridge.delivery import DeliverySettings
    from android_bridge.dicom_node import DicomNode
    from edge.reports.store import ReportStore
    from edge.studies.store import StudyStore

    tmp = tmp_path_factory.mktemp("clinic")
    studies, reports = StudyStore(tmp / "studies"), ReportStore(tmp / "reports")
    pacs = f"127.0.0.1:{_free_port()}/PACS"  # nothing listens there: the PACS is down
    model = Drafting(twin_model, 0.01)
    bridge = make_bridge(
        bundle=twin_llm_bundle,
        medsiglip_bundle=medsiglip_bundle,
        medgemma=model,
        encoder=twin_bridge.runtime.slots["medsiglip"].model,
        studies=studies,
        reports=reports,
        delivery=DeliverySettings(pacs=pacs),
    )
    node = DicomNode(studies, port=0, ae_title=AE_TITLE)
    node.start()
    bridge.dicom = {"ae_title": AE_TITLE, "host": "127.0.0.1", "port": node.port}  # as serve sets it
    server = start_server(bridge, tmp)
    yield server, model, node, studies
    server.stop()
    server.join(10)
    node.stop()
    studies.close()
    reports.close()


def push(node, *files: Path, propose: str = "-x=") -> None:
    """dcmtk's storescu sends ``files`` to the node, as a modality would; ``propose``: its
    transfer syntax option (-xs JPEG lossless, -xy JPEG baseline; default uncompressed)."""
    storescu = shutil.which("storescu")
    assert storescu, "dcmtk's storescu not found: run scripts/system-packages.sh (it installs dcmtk)"
    done = subprocess.run(
        [
            storescu,
            propose,
            "-aet",
            "MODALITY",
            "-aec",
            AE_TITLE,
            "127.0.0.1",
            str(node.port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def open_the_ct(page) -> None:
    page.locator("#studies li", has_text="CompressedSamples").locator(".study-open").click()
    page.wait_for_function(
        "() => document.getElementById('preview-facts').textContent.startsWith('CompressedSamples, CT1')"
    )
    assert page.locator("#preview-img").get_attribute("src").startswith("data:image/png")
    page.wait_for_function(
        "() => document.getElementById('encode-label').textContent.startsWith('Image ready')"
    )


def rpc_ops(page) -> list[str]:
    """The ops of the page's /v1/rpc requests so far."""
    return [json.loads(body)["op"] for body in page.rpc_bodies]


def watch_rpc(page) -> None:
    page.rpc_bodies = []
    page.on("request", lambda r: r.url.endswith("/v1/rpc") and page.rpc_bodies.append(r.post_data or "{}"))


def test_a_pushed_study_appears_opens_and_is_asked_about(clinic, browser):  # noqa: F811
    server, model, node, _ = clinic
    page = open_page(browser, server)
    watch_rpc(page)
    wait_ready(page)
    panel = page.locator("#studies-panel")
    panel.wait_for()
    page.wait_for_function(
        "() => !document.getElementById('studies-status').textContent.startsWith('Looking')"
    )
    if not page.locator("#studies li").count():  # the empty state says how studies arrive
        page.wait_for_function(
            f"() => document.getElementById('studies-status').textContent.includes('port {node.port}')"
        )
        assert AE_TITLE in page.locator("#studies-status").inner_text()

    # while the page is open: they must show up without a reload. JPEG Lossless has no decoder
    # here (stored, listed, not displayable); the ultrasound cine has 30 frames.
    push(node, _ct())
    push(node, _sample("SC_rgb_jpeg_gdcm.dcm"), propose="-xs")
    push(node, _sample("examples_ybr_color.dcm"), propose="-xy")
    row = page.locator("#studies li", has_text="CompressedSamples")
    row.wait_for(timeout=20_000)
    text = row.inner_text()
    assert "CompressedSamples, CT1 · ID 1CT1" in text and "CT" in text and "received" in text
    assert "study of 2004-01-19" in text and "1 image" in text
    cant = page.locator("#studies li", has_text="Lestrade")
    cant.locator(".study-badge .cant").wait_for()
    page.wait_for_function(
        "() => [...document.querySelectorAll('#studies .study-badge')].some(b => b.textContent.includes('JPEG Lossless'))"
    )
    cant.locator(".study-open").click()  # listed with its reason, nothing to open
    page.locator("#series .cant-open", has_text="JPEG Lossless").wait_for()
    assert page.locator("#series .instance-open").count() == 0 and page.locator("#preview").is_hidden()

    page.locator("#studies li", has_text="ID 204").locator(".study-open").click()  # the cine
    page.wait_for_function(
        "() => document.getElementById('preview-facts').textContent.includes('frame 16 of 30')"
    )
    page.get_by_label("Frame").fill("3")
    page.get_by_label("Frame").press("Enter")
    page.wait_for_function(
        "() => document.getElementById('preview-facts').textContent.includes('frame 4 of 30')"
    )
    page.wait_for_function(
        "() => document.getElementById('encode-label').textContent.startsWith('Image ready')"
    )
    sources = [json.loads(b)["params"] for b in page.rpc_bodies if json.loads(b)["op"] == "classify"]
    assert sources[-1]["image"]["frame"] == 3  # the chosen frame is what the models get

    open_the_ct(page)
    facts = page.locator("#preview-facts").inner_text()
    assert "CT" in facts and "window" in facts and "CompressedSamples, CT1" in facts
    assert page.locator("#series .instance-open[aria-current=true]").count() == 1
    page.locator("#findings li").first.wait_for()  # MedSigLIP scored the received instance
    sources = [json.loads(b)["params"] for b in page.rpc_bodies if json.loads(b)["op"] == "classify"]
    assert set(sources[-1]["image"]) == {"study", "instance"}  # by its UIDs: nothing uploaded

    page.evaluate(
        """() => { window.lengths = [];
        new MutationObserver(() => { const t = document.querySelector('#answers li .answer-text');
          if (t) window.lengths.push(t.textContent.length); })
        .observe(document.getElementById('answers'), {subtree: true, childList: true, characterData: true}); }"""
    )
    model.cap = 24
    try:
        page.locator("#question").fill("What does this CT show?")
        page.locator("#ask").click()
        page.wait_for_function("() => document.querySelector('#answers li').dataset.state === 'done'")
    finally:
        model.cap = None
    assert len(set(page.evaluate("window.lengths"))) > 2, "the answer arrived in one piece, not streamed"
    assert "not a diagnosis" in page.locator("#answers li .answer-meta").first.inner_text()
    generate = [json.loads(b)["params"] for b in page.rpc_bodies if json.loads(b)["op"] == "generate"]
    assert "study" in generate[-1]["images"][0] and "base64" not in generate[-1]["images"][0]
    assert not any(u.endswith("/v1/preview") for u in page.requests)  # shown by preview_image

    # a hidden tab asks nothing; shown again, it refreshes at once
    page.evaluate(
        "() => { Object.defineProperty(document, 'hidden', {value: true, configurable: true});"
        " document.dispatchEvent(new Event('visibilitychange')); }"
    )
    before = rpc_ops(page).count("list_studies")
    time.sleep(6)
    assert rpc_ops(page).count("list_studies") == before, "the study list was polled in a hidden tab"
    page.evaluate(
        "() => { Object.defineProperty(document, 'hidden', {value: false, configurable: true});"
        " document.dispatchEvent(new Event('visibilitychange')); }"
    )
    deadline = time.monotonic() + 3
    while rpc_ops(page).count("list_studies") == before and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    assert rpc_ops(page).count("list_studies") > before
    assert_only_the_server(page, server)
    page.context.close()


def test_a_report_is_saved_signed_sent_and_amended(clinic, browser):  # noqa: F811
    server, model, node, studies = clinic
    studies.add_file(_ct())  # (a duplicate when the push above ran first)
    page = open_page(browser, server)
    wait_ready(page)
    open_the_ct(page)
    page.locator("#saved").wait_for()
    model.delay = 0
    try:
        page.locator("#report").click()
        page.locator("#report-form:not([hidden])").wait_for()
    finally:
        model.delay = 0.01
    form = page.locator("#report-form")
    assert form.get_by_label("Impression").input_value() == DRAFT["impression"]
    form.get_by_label("Impression").fill("No acute abnormality. Small cyst in the left lobe.")
    form.get_by_label("Location").fill("left lobe of the liver")
    page.locator("#report-save").click()
    status = page.locator("#signoff-status")
    page.wait_for_function(
        "() => document.getElementById('signoff-status').textContent.includes('version 1')"
    )
    saved = page.locator("#saved-reports li")
    saved.first.wait_for()
    assert saved.first.get_attribute("data-status") == "draft"

    page.locator("#report-sign").click()  # no name yet: refused, with the reason
    assert "name and your role" in status.inner_text()
    page.get_by_label("Your name").fill("Dr Ada Test")
    page.get_by_label("Your role").fill("Radiologist")
    page.locator("#report-sign").click()
    review = page.locator("#sign-review")
    review.wait_for()
    diff = page.locator("#report-diff")
    assert "Impression" in diff.inner_text() and "Findings 1 · location" in diff.inner_text()
    added, removed = (" ".join(diff.locator(t).all_inner_texts()) for t in ("ins", "del"))
    assert "Small cyst in the left lobe." in added and "left lobe of the" in added
    assert "liver" not in removed and "No acute abnormality." not in removed  # words, not whole fields
    assert "version 1" in page.locator("#sign-confirm-text").inner_text()
    assert low_contrast(page) == []  # with the study list, the report, the diff shown
    ARTIFACTS.mkdir(exist_ok=True)
    review.screenshot(path=str(ARTIFACTS / "web-clinic-signoff.png"))
    page.locator("#sign-confirm").click()
    page.wait_for_function("() => document.getElementById('report-state').textContent.includes('Signed')")
    assert "Dr Ada Test (Radiologist)" in page.locator("#report-state").inner_text()
    impression = form.get_by_label("Impression")
    assert impression.evaluate("e => e.readOnly") and form.get_by_role("button").count() == 0
    impression.press("End")
    page.keyboard.type(" tampered")
    assert "tampered" not in impression.input_value()  # read-only
    page.wait_for_function("() => document.querySelector('#saved-reports li').dataset.status === 'signed'")
    assert "Dr Ada Test" in saved.first.inner_text()

    with page.expect_download() as got:  # exports are downloads of what the runtime built
        page.locator("[data-export=pdf]").click()
    pdf = got.value
    assert pdf.suggested_filename.endswith(".pdf") and Path(pdf.path()).read_bytes()[:5] == b"%PDF-"
    with page.expect_download() as got:
        page.locator("[data-export=fhir]").click()
    assert json.loads(Path(got.value.path()).read_text())["resourceType"] in ("Bundle", "DiagnosticReport")

    page.locator("#report-send").click()  # the PACS is down: the report waits in the outbox
    outbox = page.locator("#outbox li")
    outbox.first.wait_for()
    assert outbox.first.get_attribute("data-version") == "1"
    assert outbox.first.get_attribute("data-state") in ("queued", "failed")
    assert "PACS “PACS” at 127.0.0.1" in outbox.first.inner_text()

    page.locator("#report-amend").click()
    page.locator("#amend-save").click()  # no reason: refused
    assert "reason" in status.inner_text()
    page.get_by_label("Reason for the amendment").fill("Cyst size added")
    form.get_by_label("Impression").fill("No acute abnormality. Small 8 mm cyst in the left lobe.")
    page.locator("#amend-save").click()
    page.wait_for_function(
        "() => document.getElementById('report-state').textContent.includes('version 2, amending version 1')"
    )
    page.wait_for_function("() => document.querySelector('#saved-reports li').dataset.version === '2'")

    # someone signs version 2 elsewhere (another tab, the CLI): the page says so plainly
    report_id = _latest_id(server)
    client = HTTPClient(server.url, server.token)
    _, replies = client.replies(
        {"v": 1, "id": "elsewhere", "op": "sign_report",
         "params": {"report_id": report_id, "version": 2, "signer": "Dr B", "role": "Radiologist"}}
    )  # fmt: skip
    assert replies[0]["type"] == "result", replies
    form.get_by_label("Impression").fill("Changed after all.")
    page.locator("#report-sign").click()
    page.wait_for_function(
        "() => document.getElementById('signoff-status').textContent.includes('changed elsewhere')"
    )
    assert "version 2 is signed and can't be changed" in status.inner_text()  # the runtime's why

    page.locator("#saved-reports li").first.get_by_role("button", name="Version 1").click()  # both kept
    page.wait_for_function(
        "() => document.getElementById('report-state').textContent.includes('Signed — version 1 by Dr Ada Test')"
    )
    assert (
        form.get_by_label("Impression").input_value() == "No acute abnormality. Small cyst in the left lobe."
    )

    page.set_viewport_size({"width": 768, "height": 1024})  # a tablet: no sideways scrolling
    assert page.evaluate("document.documentElement.scrollWidth") <= 768
    page.evaluate("() => window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / "web-clinic.png"), full_page=True)
    assert_only_the_server(page, server)
    page.context.close()


def _latest_id(server) -> str:
    client = HTTPClient(server.url, server.token)
    _, replies = client.replies({"v": 1, "id": "list", "op": "list_reports", "params": {}})
    return replies[0]["result"]["reports"][0]["report_id"]


def test_without_stores_the_clinic_parts_are_hidden(twin_bridge, browser, tmp_path):  # noqa: F811
    server = start_server(make_bridge(medgemma=twin_bridge.runtime.slots["medgemma"].model), tmp_path)
    try:
        page = open_page(browser, server)
        wait_ready(page)
        page.wait_for_timeout(300)  # the health answer has been applied
        assert page.locator("#studies-panel").is_hidden() and page.locator("#outbox-panel").is_hidden()
        page.locator("#file").set_input_files(
            files=[{"name": "x.png", "mimeType": "image/png", "buffer": IMAGE_PNG}]
        )
        page.locator("#preview-img[src^='data:']").wait_for()
        assert page.locator("#saved").is_hidden()
        assert_only_the_server(page, server)
        page.context.close()
    finally:
        server.stop()
        server.join(10)
