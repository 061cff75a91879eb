"""The loopback HTTP server: OpenAI clients, the token, size limits, CORS, busy, leaks, SIGTERM,
and the error glue every route shares (bodies, statuses, Retry-After, the body limit)."""

from __future__ import annotations

import base64
import http.client
import json
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import ROOT
from fixtures_bridge import IMAGE_PNG, HTTPClient, make_bridge, start_server
from starlette.testclient import TestClient

from android_bridge.bridge import Bridge, call
from android_bridge.http.app import create_app
from android_bridge.http.glue import error_body, first_reply_status, status_for
from android_bridge.protocol import done, error, event
from android_bridge.runtime import Runtime
from android_bridge.settings import ServeSettings

DATA_URL = "data:image/png;base64," + base64.b64encode(IMAGE_PNG).decode()


@pytest.fixture(scope="module")
def openai_client(small_transports):
    import openai

    s = small_transports.server
    return openai.OpenAI(base_url=s.url + "/v1", api_key=s.token, max_retries=0)


TOKEN = "c0ffee" * 11


class Scripted(Bridge):
    """A bridge without models whose every request gets ``script(id)`` as its replies, so each
    route's answer to a given first reply (loading, busy, a late error) can be pinned."""

    def __init__(self, script):
        super().__init__(Runtime())
        self.script = script

    def handle(self, raw, emit) -> str:
        rid = raw.get("id") if isinstance(raw, dict) else json.loads(raw)["id"]
        for msg in self.script(rid):
            emit(msg)
        return "error"


def _test_client(script=lambda rid: []):
    app = create_app(ServeSettings(token=TOKEN, max_body_bytes=4096), Scripted(script))
    return TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"})


def _oai(code: str, message: str) -> dict:
    return {"error": {"message": message, "type": code, "code": code, "param": None}}


def _conn(server) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(server.host, server.port, timeout=60)


def test_openai_client_streams_a_chat_completion(openai_client, small_bridge):
    stream = openai_client.chat.completions.create(
        model="medgemma",
        messages=[{"role": "user", "content": "What are the common symptoms of pneumonia?"}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(text.split()) >= 3 and finish == ["length"]
    assert chunks[-1].usage.completion_tokens == 16
    direct = call(
        small_bridge,
        {
            "v": 1,
            "id": "d",
            "op": "generate",
            "params": {
                "messages": [{"role": "user", "content": "What are the common symptoms of pneumonia?"}],
                "max_tokens": 16,
            },
        },
    )
    assert text == direct[-2]["result"]["text"]  # the same greedy answer through both doors
    whole = openai_client.chat.completions.create(
        model="medgemma", messages=[{"role": "user", "content": "Define pneumonia."}], max_tokens=8
    )
    assert whole.choices[0].message.content and whole.usage.completion_tokens == 8
    assert [m.id for m in openai_client.models.list().data] == ["medgemma"]


def test_openai_client_images_and_embeddings(twin_transports, twin_bridge):
    import openai

    s = twin_transports.server
    client = openai.OpenAI(base_url=s.url + "/v1", api_key=s.token, max_retries=0)
    reply = client.chat.completions.create(
        model="medgemma",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": DATA_URL}},
                    {"type": "text", "text": "Describe."},
                ],
            }
        ],
        max_tokens=3,
    )
    text_only = call(
        twin_bridge,
        {
            "v": 1,
            "id": "t0",
            "op": "generate",
            "params": {
                "messages": [{"role": "user", "content": [{"type": "text", "text": "Describe."}]}],
                "max_tokens": 1,
            },
        },
    )
    assert reply.usage.prompt_tokens > text_only[-1]["usage"]["prompt_tokens"] + 8  # the image's tokens
    emb = client.embeddings.create(model="medsiglip", input=["pleural effusion", DATA_URL])  # base64 transfer
    direct_txt = call(
        twin_bridge, {"v": 1, "id": "t", "op": "embed_text", "params": {"texts": ["pleural effusion"]}}
    )
    direct_img = call(twin_bridge, {"v": 1, "id": "i", "op": "embed_image", "params": {"image": DATA_URL}})
    assert np.allclose(emb.data[0].embedding, direct_txt[-2]["result"]["embeddings"][0], atol=1e-6)
    assert np.allclose(emb.data[1].embedding, direct_img[-2]["result"]["embeddings"][0], atol=1e-6)
    floats = client.embeddings.create(model="medsiglip", input="effusion", encoding_format="float")
    assert len(floats.data[0].embedding) == direct_txt[-2]["result"]["dim"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="medgemma",
            max_tokens=2,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}],
                }
            ],
        )


def test_wrong_or_missing_token_is_401_and_the_connection_stays_usable(twin_transports):
    s = twin_transports.server
    conn = _conn(s)
    health = json.dumps({"v": 1, "id": "h", "op": "health"})
    for headers in ({}, {"Authorization": "Bearer " + "0" * 64}, {"Authorization": s.token}):
        conn.request("POST", "/v1/rpc", body=health, headers=headers)
        resp = conn.getresponse()
        assert resp.status == 401 and json.loads(resp.read())["error"]["code"] == "unauthorized"
        assert resp.getheader("www-authenticate") == "Bearer"
    sock = conn.sock
    conn.request("POST", "/v1/rpc", body=health, headers={"Authorization": f"Bearer {s.token}"})
    resp = conn.getresponse()
    assert resp.status == 200 and conn.sock is sock  # same TCP connection
    assert json.loads(resp.read().splitlines()[-1])["finish_reason"] == "stop"
    conn.close()


def test_oversized_bodies_get_413(twin_bridge, tmp_path):
    server = start_server(
        make_bridge(medgemma=twin_bridge.runtime.slots["medgemma"].model), tmp_path, max_body_bytes=4096
    )
    try:
        big = json.dumps({"v": 1, "id": "big", "op": "generate", "params": {"prompt": "x" * 10_000}})
        for chunked in (False, True):
            conn = _conn(server)
            headers = {"Authorization": f"Bearer {server.token}"}
            body = iter([big[:3000].encode(), big[3000:].encode()]) if chunked else big
            conn.request("POST", "/v1/rpc", body=body, headers=headers, encode_chunked=chunked)
            resp = conn.getresponse()
            assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "too_large"
            conn.close()
        ok = HTTPClient(server.url, server.token).replies({"v": 1, "id": "small", "op": "health"})
        assert ok[0] == 200
    finally:
        server.stop()
        server.join(10)


def test_no_cors_headers_and_typed_http_errors(twin_transports):
    s = twin_transports.server
    conn = _conn(s)
    conn.request(
        "OPTIONS",
        "/v1/rpc",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 401 and not [
        h for h, _ in resp.getheaders() if h.lower().startswith("access-control")
    ]
    client = HTTPClient(s.url, s.token)
    status, replies = client.replies(b"\xff not json")
    assert (
        status == 400 and replies[0]["error"]["code"] == "invalid_request" and replies[-1]["type"] == "done"
    )
    conn.request("POST", "/v1/chat/completions", body="{", headers=client.headers())
    resp = conn.getresponse()
    assert resp.status == 400 and json.loads(resp.read())["error"]["type"] == "invalid_request"
    conn.close()


def test_busy_is_429_with_retry_after_and_a_dropped_client_cancels(small_transports, small_bridge):
    s = small_transports.server
    a = _conn(s)
    body = {
        "v": 1,
        "id": "hold",
        "op": "generate",
        "params": {"prompt": "Explain sepsis in detail.", "max_tokens": 300},
    }
    a.request("POST", "/v1/rpc", body=json.dumps(body), headers=HTTPClient(s.url, s.token).headers())
    resp = a.getresponse()
    assert json.loads(resp.readline())["event"] == "token"
    status, replies = HTTPClient(s.url, s.token).replies({**body, "id": "second"})
    assert status == 429 and replies[0]["error"]["code"] == "busy" and replies[-1]["finish_reason"] == "error"
    a.sock.shutdown(2)  # the app goes away mid-stream
    a.close()
    deadline = time.monotonic() + 30
    while small_bridge.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert small_bridge.active == 0 and not small_bridge.runtime.slots["medgemma"].model.busy
    after = HTTPClient(s.url, s.token).replies(
        {**body, "id": "after", "params": {"prompt": "Hi", "max_tokens": 2}}
    )
    assert after[0] == 200 and after[1][-1]["finish_reason"] in ("stop", "length")


def test_100_sequential_requests_do_not_leak(twin_transports):
    import psutil

    proc = psutil.Process()
    client = HTTPClient(twin_transports.server.url, twin_transports.server.token)
    reqs = [
        {"v": 1, "id": "h", "op": "health"},
        {"v": 1, "id": "g", "op": "generate", "params": {"prompt": "Hi", "max_tokens": 2}},
        {"v": 1, "id": "e", "op": "embed_text", "params": {"texts": ["effusion"]}},
        {"v": 1, "id": "i", "op": "embed_image", "params": {"image": DATA_URL}},
    ]

    def run(n):
        for k in range(n):
            status, replies = client.replies({**reqs[k % 4], "id": f"r{k}"})
            assert status == 200 and replies[-1]["finish_reason"] in ("stop", "length")

    run(40)  # warm-up: allocator pools, onnxruntime arenas, worker threads
    before = proc.memory_info().rss
    run(100)
    grown = (proc.memory_info().rss - before) / 2**20
    print(f"RSS growth over 100 requests: {grown:.1f} MiB")
    assert grown < 32, f"RSS grew {grown:.1f} MiB over 100 requests (bound 32 MiB)"


def test_serve_command_endpoint_file_and_sigterm(small_model_bundle, tmp_path):
    ep = tmp_path / "run" / "endpoint.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medgemma_edge",
            "serve",
            "-b",
            str(small_model_bundle),
            "--ctx",
            "1024",
            "--endpoint-file",
            str(ep),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not ep.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        info = json.loads(ep.read_text())
        assert (ep.stat().st_mode & 0o777) == 0o600 and info["pid"] == proc.pid and len(info["token"]) == 64
        assert info["host"] == "127.0.0.1" and info["port"] > 0
        assert proc.stdout.readline().strip().startswith(f"medgemma-edge serve: {info['url']}")
        client = HTTPClient(info["url"], info["token"])
        for _ in range(600):  # the model loads in the background (health shows loading meanwhile)
            status, replies = client.replies({"v": 1, "id": "h", "op": "health"})
            if replies[0]["result"]["models"]["medgemma"]["state"] == "ready":
                break
            time.sleep(0.1)
        seen = []
        for msg in client.stream(
            {
                "v": 1,
                "id": "long",
                "op": "generate",
                "params": {"prompt": "Explain sepsis in detail.", "max_tokens": 800},
            }
        ):
            seen.append(msg)
            if len(seen) == 2:
                proc.send_signal(signal.SIGTERM)
        assert seen[-1]["type"] == "done" and seen[-1]["finish_reason"] == "cancelled"
        assert proc.wait(30) == 0
        assert not ep.exists()
        err = proc.stderr.read()
        assert "sepsis" not in err  # no patient content in logs
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_stdio_command(twin_llm_bundle):
    lines = [
        {"v": 1, "id": "h", "op": "health"},
        {"v": 1, "id": "bye", "op": "shutdown"},
    ]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medgemma_edge",
            "serve",
            "-b",
            str(twin_llm_bundle),
            "--ctx",
            "256",
            "--stdio",
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    watchdog = threading.Timer(120, proc.kill)  # a hang fails the test instead of stalling the suite
    watchdog.start()
    proc.stdin.write(json.dumps(lines[0]).encode() + b"\n")
    proc.stdin.flush()
    health = [json.loads(proc.stdout.readline()) for _ in range(2)]
    assert health[0]["result"]["protocol"] == 1 and health[1]["type"] == "done"
    assert health[0]["result"]["models"]["medgemma"]["state"] in ("loading", "ready")
    for _ in range(600):  # generate until the background load is done
        proc.stdin.write(b'{"v":1,"id":"g","op":"generate","params":{"prompt":"hi","max_tokens":2}}\n')
        proc.stdin.flush()
        replies = []
        while not replies or replies[-1]["type"] != "done":
            replies.append(json.loads(proc.stdout.readline()))
        if replies[0].get("error", {}).get("code") != "loading":
            break
        time.sleep(0.2)
    assert replies[-1]["finish_reason"] in ("stop", "length") and replies[-2]["type"] == "result"
    out, _ = proc.communicate(json.dumps(lines[1]).encode() + b"\n", timeout=60)
    watchdog.cancel()
    assert proc.returncode == 0
    assert [json.loads(x)["type"] for x in out.splitlines()] == ["result", "done"]


def test_the_glue_maps_codes_to_statuses_and_retry_after():
    assert status_for("loading", 2.2) == (503, {"retry-after": "3"})
    assert status_for("busy", 0.01) == (429, {"retry-after": "1"})  # never 0: clients would spin
    assert status_for("no_such_code") == (500, {})
    assert first_reply_status(event("x", "token", text="a", n_tokens=1)) == (200, {})
    assert first_reply_status(error("x", "not_loaded", "load it")) == (409, {})
    assert error_body("busy", "m") == {"error": {"code": "busy", "message": "m", "type": "busy"}}
    assert error_body("busy", "m", openai=True) == _oai("busy", "m")


@pytest.mark.parametrize(
    ("code", "retry_after", "status", "header"), [("loading", 2.2, 503, "3"), ("busy", 0.1, 429, "1")]
)
def test_the_first_reply_decides_the_status_on_every_route(code, retry_after, status, header):
    client = _test_client(
        lambda rid: [error(rid, code, "not now", retry_after=retry_after), done(rid, "error")]
    )
    r = client.post("/v1/rpc", content=json.dumps({"v": 1, "id": "r1", "op": "health"}))
    assert (r.status_code, r.headers["retry-after"], r.headers["content-type"]) == (
        status,
        header,
        "application/x-ndjson",
    )
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert lines[0]["error"] == {"code": code, "message": "not now", "retry_after": retry_after}
    assert lines[-1]["type"] == "done"
    chat = {"messages": [{"role": "user", "content": "x"}]}
    for url, body in (
        ("/v1/chat/completions", chat),
        ("/v1/chat/completions", {**chat, "stream": True}),
        ("/v1/embeddings", {"input": "x"}),
    ):
        r = client.post(url, json=body)
        assert (r.status_code, r.headers["retry-after"]) == (status, header)
        assert r.headers["content-type"] == "application/json" and r.json() == _oai(code, "not now")


def test_an_error_after_the_first_reply_keeps_200_on_rpc_and_is_500_for_openai():
    client = _test_client(
        lambda rid: [
            event(rid, "token", text="a", n_tokens=1),
            error(rid, "internal", "boom"),
            done(rid, "error"),
        ]
    )
    r = client.post("/v1/rpc", content=json.dumps({"v": 1, "id": "r1", "op": "health"}))
    assert r.status_code == 200 and "retry-after" not in r.headers
    assert [json.loads(x)["type"] for x in r.text.splitlines()] == ["event", "error", "done"]
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 500 and r.json() == _oai("internal", "boom")
    r = client.post(
        "/v1/chat/completions", json={"stream": True, "messages": [{"role": "user", "content": "x"}]}
    )
    assert r.status_code == 200 and 'data: {"error": {"message": "boom", "type": "internal"}}' in r.text


def test_body_errors_keep_each_routes_shape():
    client = _test_client()

    def chunked():  # no Content-Length: counted as it arrives
        yield b"x" * 3000
        yield b"x" * 3000

    r = client.post("/v1/rpc", content=b"x" * 5000)  # Content-Length over the limit: the guard
    assert (r.status_code, r.headers["connection"]) == (413, "close")
    assert r.content == json.dumps(error_body("too_large", "request body over 4096 bytes")).encode()
    r = client.post("/v1/rpc", content=chunked())
    assert (r.status_code, r.headers["connection"]) == (413, "close")
    assert r.json() == error_body("too_large", "request body too large")
    for url in ("/v1/chat/completions", "/v1/embeddings"):
        r = client.post(url, content=chunked())
        assert r.status_code == 413 and r.json() == _oai("too_large", "request body too large")
    r = client.post("/v1/preview", content=chunked())
    assert r.status_code == 413 and r.headers["cache-control"] == "no-store"
    assert r.json() == error_body("too_large", "the image is larger than this runtime accepts in one request")
    for raw, message in (
        (b"{", "the body is not valid JSON"),
        (b"\xff", "the body is not valid JSON"),
        (b"[1]", "the body must be a JSON object"),
    ):
        r = client.post("/v1/chat/completions", content=raw)
        assert r.status_code == 400 and r.json() == _oai("invalid_request", message)
    r = client.post("/v1/rpc", content=b"{}", headers={"Authorization": "Bearer " + "0" * 64})
    assert (r.status_code, r.headers["www-authenticate"]) == (401, "Bearer")
    assert (
        r.content
        == json.dumps(
            error_body("unauthorized", "missing or wrong bearer token (see the endpoint file)")
        ).encode()
    )
