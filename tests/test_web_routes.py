"""The clinician's page over plain HTTP, no browser: the page and its assets (CSP, no token),
``/v1/web/config``, ``/v1/preview``'s codes, and ``serve --open``. The page itself, in a real
browser, is tests/test_web_page.py."""

from __future__ import annotations

import http.client
import json
import re
from pathlib import Path

from conftest import png_header_only
from fixtures_bridge import IMAGE_PNG
from pydicom.data import get_testdata_file

from android_bridge.http.page import STATIC, WEB


def test_page_and_routes_over_http(twin_transports):
    server = twin_transports.server
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)

    def get(path, headers=None):
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp, resp.read()

    resp, body = get("/", {"Accept": "text/html,application/xhtml+xml"})
    csp = resp.getheader("content-security-policy")
    assert (
        resp.status == 200
        and b"<main" in body
        and "default-src 'self'" in csp
        and "connect-src 'self'" in csp
    )
    assert (
        resp.getheader("x-content-type-options") == "nosniff"
        and resp.getheader("cache-control") == "no-store"
    )
    resp, body = get("/")  # API clients keep their JSON
    assert json.loads(body)["protocol"] == 1
    assert {p.name for p in WEB.iterdir()} == {*STATIC, "index.html"}  # every asset is served
    for name, kind in STATIC.items():
        resp, body = get(f"/static/{name}")  # no token: the assets carry no data
        assert resp.status == 200 and resp.getheader("content-type") == kind and body
    assert get("/static/../page.py")[0].status in (401, 404)
    assert get("/v1/web/config")[0].status == 401
    auth = {"Authorization": f"Bearer {server.token}"}
    resp, body = get("/v1/web/config", auth)
    config = json.loads(body)
    assert config["limits"]["max_image_pixels"] > 0 and "findings" in config["report"]["schema"]["properties"]
    assert resp.getheader("cache-control") == "no-store"

    def preview(data: bytes, query: str = ""):
        conn.request("POST", "/v1/preview" + query, body=data, headers=auth)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())

    status, png = preview(IMAGE_PNG)
    assert status == 200 and png["image"].startswith("data:image/png;base64,") and png["format"] == "png"
    status, ct = preview(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    assert (
        status == 200
        and ct["format"] == "dicom"
        and ct["info"]["modality"] == "CT"
        and "window" in ct["info"]
    )
    status, bad = preview(b"just some notes, not an image")
    assert (
        status == 400
        and bad["error"]["code"] == "invalid_request"
        and "not an image" in bad["error"]["message"]
    )
    status, huge = preview(png_header_only(9000, 8000))
    assert status == 413 and huge["error"]["code"] == "too_large" and "megapixels" in huge["error"]["message"]
    status, frame = preview(IMAGE_PNG, "?frame=x")
    assert status == 400
    conn.close()
    for path in WEB.iterdir():  # all assets local: no URL of another host anywhere in the page
        text = path.read_text(encoding="utf-8")
        urls = set(re.findall(r"https?://[^\s\"'<>)]+", text)) - {"http://www.w3.org/2000/svg"}
        assert not urls and not re.search(r"""(src|href)\s*=\s*["']//|url\(|@import""", text), path


def test_serve_open_opens_the_page_with_its_token(twin_llm_bundle, tmp_path, monkeypatch, capsys):
    import signal
    import webbrowser

    from android_bridge.http.server import RunningServer
    from medgemma_edge.cli import build_parser

    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", lambda url: opened.append(url) or True)
    monkeypatch.setattr(RunningServer, "run", lambda self: None)  # start, open, stop at once
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # keep pytest's own handlers
    ep = tmp_path / "endpoint.json"
    argv = ["serve", "-b", str(twin_llm_bundle), "--ctx", "256", "--endpoint-file", str(ep), "--open"]
    args = build_parser().parse_args(argv)
    assert args.func(args) == 0
    info = json.loads(ep.read_text())
    assert opened == [info["page"]] and info["page"] == f"{info['url']}/#token={info['token']}"
    out = capsys.readouterr().out
    assert f"web page: {info['url']}/" in out and info["token"] not in out  # stdout is not a terminal here
