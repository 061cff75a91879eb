"""The clinician's web page, end to end in a real headless Chromium (Debian's, driven by Playwright).

A real server on port 0 serves the tiny MedGemma twin (each token held back a little, so that
streaming and Stop are observable), MedSigLIP and a small case index. Every request the page
makes is recorded and must go to that server; a screenshot is left in test-artifacts/. The
page's routes over plain HTTP, without a browser, are tests/test_web_routes.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from conftest import ROOT
from fixtures_bridge import IMAGE_PNG, make_bridge, start_server
from PIL import Image

from edge.medgemma.settings import MedGemmaSettings

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--no-first-run",
    "--disable-domain-reliability",
    "--disable-features=OptimizationHints,MediaRouter,Translate",
]
ARTIFACTS = ROOT / "test-artifacts"
WAIT_MS = 60_000  # generous: the suite may share a slow CPU


class Paced:
    """The real model, but each token held back ``delay`` seconds (a fast twin would finish
    before a person, or a test, could press Stop) and answers capped at ``cap`` tokens when set
    (the page asks for long answers; a shared, slow CPU need not produce them)."""

    def __init__(self, model, delay: float):
        self._model = model
        self.delay = delay
        self.cap: int | None = None

    def __getattr__(self, name):
        return getattr(self._model, name)

    def stream(self, *args, options=None, **kwargs):
        if self.cap and options is not None:
            options = dataclasses.replace(options, max_tokens=min(options.max_tokens or self.cap, self.cap))
        for piece in self._model.stream(*args, options=options, **kwargs):
            if piece.text and self.delay:
                time.sleep(self.delay)
            yield piece


@pytest.fixture(scope="module")
def case_index(twin_bridge, tmp_path_factory) -> Path:
    from edge.cases.index import CaseIndex

    encoder = twin_bridge.runtime.slots["medsiglip"].model
    src = tmp_path_factory.mktemp("web-cases")
    rng = np.random.default_rng(5)
    for i in range(3):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).save(src / f"case{i}.png")
    shutil.copyfile(_dicom(), src / "ct.dcm")
    root = src.parent / "web-index"
    with CaseIndex.open(root, encoder=encoder, create=True) as index:
        index.add([src], encoder=encoder, meta={"site": "ward 3"}, copy=True)
    return root


@pytest.fixture(scope="module")
def web(twin_bridge, twin_model, twin_llm_bundle, medsiglip_bundle, case_index, tmp_path_factory):
    model = Paced(twin_model, 0.01)
    bridge = make_bridge(
        bundle=twin_llm_bundle,
        medsiglip_bundle=medsiglip_bundle,
        index_dir=case_index,
        medgemma=model,
        encoder=twin_bridge.runtime.slots["medsiglip"].model,
    )
    server = start_server(bridge, tmp_path_factory.mktemp("web-server"))
    yield server, model
    server.stop()
    server.join(10)


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM.is_file(), f"{CHROMIUM} not found: run scripts/system-packages.sh (it installs chromium)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[dev]' (make test does)")

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def _dicom() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm"))


def open_page(browser, server, *, width=1280, height=720, token=True):
    """A fresh tab on the page; ``requests`` collects every URL it asks for."""
    context = browser.new_context(viewport={"width": width, "height": height})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.requests, page.problems = [], []
    page.on("request", lambda r: page.requests.append(r.url))
    page.on("pageerror", lambda e: page.problems.append(f"uncaught: {e}"))
    page.on(  # CSP violations, script errors; a refused or failed fetch is reported by the page itself
        "console",
        lambda m: (
            m.type == "error"
            and not m.text.startswith("Failed to load resource")
            and page.problems.append(m.text)
        ),
    )
    page.goto(server.page_url if token else server.url + "/")
    return page


def assert_only_the_server(page, server) -> None:
    """Every request went to the server (or stayed in the page), and nothing went wrong in it."""
    assert page.problems == []
    here = f"{server.host}:{server.port}"
    for url in page.requests:
        parts = urlsplit(url)
        assert parts.scheme in ("data", "blob") or parts.netloc == here, f"the page asked {url!r}"


CONTRAST = """() => {
  const rgb = (c) => (c.match(/[\\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => {
    const f = (v) => ((v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const background = (e) => {
    for (; e; e = e.parentElement) {
      const c = rgb(getComputedStyle(e).backgroundColor);
      if (c.length === 3 || c[3] > 0) return c;
    }
    return [255, 255, 255];
  };
  const bad = [];
  for (const e of document.querySelectorAll("body *")) {
    const own = [...e.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
    if (!own || !e.getClientRects().length || e.closest(".visually-hidden")) continue;
    const a = lum(rgb(getComputedStyle(e).color)), b = lum(background(e));
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    if (ratio < 4.5) bad.push(`${e.tagName}.${e.className}: ${ratio.toFixed(2)}`);
  }
  return bad;
}"""


def low_contrast(page) -> list[str]:
    """Text whose colour against its background is under WCAG AA's 4.5:1."""
    return page.evaluate(CONTRAST)


def wait_ready(page) -> None:
    page.wait_for_function("() => document.getElementById('runtime').textContent.includes('MedGemma ready')")


def test_ask_about_a_png_and_a_dicom_stop_findings_cases_report(web, browser, tmp_path):
    server, model = web
    page = open_page(browser, server)
    assert "#token" not in page.url and server.token not in page.url  # moved out of the address bar
    wait_ready(page)
    notice = page.locator("#notice")
    assert "not a diagnosis" in notice.inner_text() and "synthetic twin" in notice.inner_text()
    # the controls have labels (keyboard and screen-reader users reach every one of them)
    unlabeled = page.evaluate(
        "[...document.querySelectorAll('input, select, textarea')]"
        ".filter(e => !e.labels.length && !e.getAttribute('aria-label')).map(e => e.id)"
    )
    assert unlabeled == []

    assert low_contrast(page) == []
    png = tmp_path / "chest.png"
    Image.fromarray((np.random.default_rng(1).random((300, 260)) * 255).astype("uint8")).save(png)
    order = []
    for _ in range(20):  # by keyboard: Tab to the drop zone's file input, Space opens the picker
        page.keyboard.press("Tab")
        order.append(page.evaluate("() => document.activeElement.id || document.activeElement.tagName"))
        if order[-1] == "file":
            break
    assert order[-1] == "file", f"Tab never reached the file input: {order}"
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    chooser = None
    for attempt in range(2):
        # Space on the focused file input opens the picker; in two of ~15 full-suite runs headless
        # Chromium dropped the first keypress (no file chooser in 60 s, focus still on the input),
        # so a second press is allowed, with the focus checked before each one
        focused = page.evaluate("() => document.activeElement.id")
        assert focused == "file", f"the focus left the file input (now on {focused!r}) before Space"
        try:
            with page.expect_file_chooser(timeout=20_000) as chooser:
                page.keyboard.press("Space")
            break
        except PlaywrightTimeout:
            if attempt:
                raise
    chooser.value.set_files(str(png))
    page.locator("#preview-img[src^='data:image/png']").wait_for()
    page.wait_for_function(
        "() => document.getElementById('encode-label').textContent.startsWith('Image ready')"
    )
    page.locator("#findings li").first.wait_for()
    assert page.locator("#findings .bar-value").count() >= 2
    assert "not probabilities of disease" in page.locator("[aria-labelledby=findings-h] .note").inner_text()
    page.locator("#cases img[src^='data:image/png']").first.wait_for()
    assert (
        "ward 3" in page.locator("#cases").inner_text()
        and "similarity" in page.locator("#cases").inner_text()
    )

    page.evaluate(
        """() => { window.lengths = [];
        new MutationObserver(() => { const t = document.querySelector('#answers li .answer-text');
          if (t) window.lengths.push(t.textContent.length); })
        .observe(document.getElementById('answers'), {subtree: true, childList: true, characterData: true}); }"""
    )
    model.cap = 24
    page.locator("#question").fill("Describe the findings.")
    page.locator("#ask").click()
    first = page.locator("#answers li").first
    page.wait_for_function("() => document.querySelector('#answers li').dataset.state === 'done'")
    model.cap = None
    assert int(first.get_attribute("data-tokens")) > 1
    lengths = page.evaluate("window.lengths")
    assert len(set(lengths)) > 2, "the answer arrived in one piece, not streamed"
    meta = first.locator(".answer-meta").inner_text()
    assert "synthetic twin" in meta and "not a diagnosis" in meta and "image from the cache" in meta
    assert "bundle “twin”" in meta  # which model and bundle produced this answer

    page.locator("#file").set_input_files(str(_dicom()))
    page.wait_for_function("() => document.getElementById('preview-facts').textContent.includes('DICOM')")
    facts = page.locator("#preview-facts").inner_text()
    assert "CT" in facts and "window" in facts
    page.wait_for_function(
        "() => document.getElementById('encode-label').textContent.startsWith('Image ready')"
    )

    page.locator("#length").select_option("1024")
    page.locator("#question").fill("Explain everything you see.")
    page.locator("#question").press("Control+Enter")  # the keyboard way to ask
    page.wait_for_function("() => Number(document.querySelector('#answers li').dataset.tokens) >= 3")
    page.locator("#stop").click()
    page.wait_for_function("() => document.querySelector('#answers li').dataset.state === 'stopped'")
    assert page.locator("#answers li").first.get_attribute("data-finish") == "cancelled"  # the server's done
    assert "Stopped" in page.locator("#answers li .answer-status").first.inner_text()
    assert server.bridge.active <= 1 and not model.busy  # (the page's health poll may be in flight)

    model.delay, model.cap = 0, 40  # a report is long: no need to watch it stream
    try:
        page.locator("#report").click()
        page.locator("#report-form:not([hidden])").wait_for()
    finally:
        model.delay, model.cap = 0.01, None
    form = page.locator("#report-form")
    for field in ("Modality", "Impression", "Needs review"):
        assert form.get_by_label(field).count() == 1, field
    page.locator("#report-form").get_by_label("Impression").fill("No acute findings (test).")
    report = json.loads(page.locator("#report-json").text_content())
    assert report["impression"] == "No acute findings (test)." and "findings" in report
    page.get_by_role("button", name="Add finding").click()
    assert json.loads(page.locator("#report-json").text_content())["findings"][-1] == {
        "finding": "",
        "location": "",
        "certainty": "",
    }

    assert low_contrast(page) == []  # with answers, findings, cases and the report form shown
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "web-page.png"
    shot.unlink(missing_ok=True)
    page.evaluate("() => window.scrollTo(0, 0)")  # the sticky notice then sits at the top of the picture
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(shot).size[0] == 1280
    assert_only_the_server(page, server)
    assert any(u.endswith("/v1/preview") for u in page.requests)
    page.context.close()


def test_tablet_width_has_no_sideways_scrolling(web, browser):
    server, _ = web
    page = open_page(browser, server, width=768, height=1024)
    wait_ready(page)
    assert page.evaluate("document.documentElement.scrollWidth") <= 768
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-page-tablet.png"))
    columns = page.evaluate("getComputedStyle(document.querySelector('main')).gridTemplateColumns")
    assert len(columns.split()) == 1  # one column on a tablet
    assert_only_the_server(page, server)
    page.context.close()


def test_bad_files_get_clear_messages(web, browser, tmp_path):
    server, _ = web
    page = open_page(browser, server)
    wait_ready(page)
    notes = tmp_path / "notes.png"
    notes.write_text("Patient notes, not a picture.")
    page.locator("#file").set_input_files(str(notes))
    alert = page.locator("#alert")
    alert.wait_for()
    assert "notes.png" in alert.inner_text() and "not an image" in alert.inner_text()
    huge = tmp_path / "huge.png"
    Image.new("1", (9000, 8000)).save(huge)  # 72 MP, over the runtime's 64 MP
    page.locator("#file").set_input_files(str(huge))
    page.wait_for_function("() => document.getElementById('alert-text').textContent.includes('huge.png')")
    assert "megapixels" in alert.inner_text() and "Downscale" in alert.inner_text()
    assert not any(u.endswith("/v1/preview") for u in page.requests)  # refused before uploading
    assert page.locator("#preview").is_hidden()
    page.locator("#question").fill("")
    page.locator("#ask").click()
    assert "Type a question" in page.locator("#ask-status").inner_text()
    assert_only_the_server(page, server)
    page.context.close()


def test_a_stopped_server_is_explained_and_nothing_hangs(twin_bridge, browser, tmp_path):
    server = start_server(make_bridge(medgemma=twin_bridge.runtime.slots["medgemma"].model), tmp_path)
    page = open_page(browser, server)
    wait_ready(page)
    server.stop()
    server.join(15)
    page.locator("#question").fill("Is anyone there?")
    t0 = time.monotonic()
    page.locator("#ask").click()
    page.wait_for_function(
        "() => document.getElementById('alert-text').textContent.includes('not reachable')", timeout=10_000
    )
    assert time.monotonic() - t0 < 10
    page.wait_for_function("() => !document.getElementById('ask').disabled", timeout=10_000)  # nothing hangs
    assert "not reachable" in page.locator("#runtime").inner_text()
    assert_only_the_server(page, server)
    page.context.close()


def test_the_token_stays_out_of_logs_and_the_page_needs_it(web, browser, caplog):
    server, _ = web
    with caplog.at_level("DEBUG"):
        page = open_page(browser, server, token=False)
        page.locator("#alert").wait_for()
        assert "access key" in page.locator("#alert").inner_text()
        assert page.locator("#ask").is_disabled()
        page.context.close()
        page = open_page(browser, server)
        wait_ready(page)
        page.locator("#file").set_input_files(
            files=[{"name": "scan.png", "mimeType": "image/png", "buffer": IMAGE_PNG}]
        )
        page.locator("#preview-img[src^='data:']").wait_for()
        page.context.close()
    assert caplog.records and server.token not in caplog.text and "#token" not in caplog.text
    assert not [u for u in page.requests if server.token in u]  # the fragment is never requested
    assert_only_the_server(page, server)


def test_the_page_waits_while_the_model_loads(twin_llm_bundle, browser, tmp_path):
    bridge = make_bridge(bundle=twin_llm_bundle, medgemma_settings=MedGemmaSettings(n_ctx=256))
    gate, real_open = threading.Event(), bridge.runtime.opener
    bridge.runtime.opener = lambda *a: (gate.wait(60), real_open(*a))[1]  # hold the load open
    server = start_server(bridge, tmp_path)
    loader = bridge.preload(["medgemma"])
    try:
        page = open_page(browser, server)
        page.wait_for_function(
            "() => document.getElementById('runtime').textContent.includes('MedGemma loading')"
        )
        page.locator("#length").select_option("128")
        page.locator("#question").fill("Hello?")
        page.locator("#ask").click()
        page.wait_for_function(
            "() => document.querySelector('#answers li .answer-status').textContent.includes('still loading')"
        )
        assert page.locator("#stop").is_enabled()  # the wait can be stopped
        gate.set()
        page.wait_for_function("() => document.querySelector('#answers li').dataset.state === 'done'")
        assert_only_the_server(page, server)
        page.context.close()
    finally:
        gate.set()
        loader.join(60)
        server.stop()
        server.join(10)
        bridge.shutdown(grace_s=1)


def test_a_multiframe_dicom_shows_its_frames(web, browser):
    import pydicom

    server, _ = web
    page = open_page(browser, server)
    wait_ready(page)
    cine = Path(pydicom.__file__).parent / "data" / "test_files" / "examples_ybr_color.dcm"  # 30 frames
    page.locator("#file").set_input_files(str(cine))
    page.wait_for_function(
        "() => document.getElementById('preview-facts').textContent.includes('frame 16 of 30')"
    )
    assert page.locator("#frame-row").is_visible()
    page.get_by_label("Frame").fill("3")
    page.get_by_label("Frame").press("Enter")  # commits the number: a change event
    page.wait_for_function(
        "() => document.getElementById('preview-facts').textContent.includes('frame 4 of 30')"
    )
    page.locator("#findings li").first.wait_for()  # scored on the chosen frame
    assert_only_the_server(page, server)
    page.context.close()
