"""Typed errors for every malformed request, and the server's resource guards.

Each failure class found by hand or by tests/test_fuzz.py is pinned here (deep JSON, NaN,
out-of-range numbers, lone surrogates, wrong param types, odd OpenAI bodies), then each guard of
``android_bridge.settings.Limits``: the per-request wall clock and token cap, requests in
flight, HTTP and Unix-socket connections, images and pixels per request.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import logging
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures_bridge import IMAGE_PNG, TRANSPORTS, start_server

from android_bridge.bridge import Bridge, call
from android_bridge.media import generate_options
from android_bridge.protocol import ERROR_CODES, ProtocolError
from android_bridge.runtime import Runtime
from android_bridge.settings import Limits, ServeSettings
from edge.errors import UsageError
from edge.medgemma.generation import GenerateOptions, Piece
from edge.settings import from_mapping

PNG_B64 = base64.b64encode(IMAGE_PNG).decode()


def _error(replies: list[dict]) -> dict:
    assert replies[-1]["type"] == "done" and [r["type"] for r in replies].count("done") == 1, replies
    errors = [r["error"] for r in replies if r["type"] == "error"]
    assert len(errors) == 1, replies
    assert errors[0]["code"] in ERROR_CODES
    return errors[0]


# -- malformed requests: every transport answers with a typed error ------------------------------------

NASTY = [
    ("[" * 10000 + "]" * 10000, "invalid_request", "nested deeper"),
    (
        '{"v":1,"id":"d","op":"health","params":{"x":' + "[" * 900 + "]" * 900 + "}}",
        "invalid_request",
        "nested",
    ),
    ('{"v":1,"id":"n","op":"health","params":{"x":NaN}}', "invalid_request", "NaN"),
    ('{"v":1,"id":"i","op":"health","params":{"x":-Infinity}}', "invalid_request", "Infinity"),
    ('{"v":1,"id":"o","op":"health","params":{"x":1e400}}', "invalid_request", "out of range"),
    ('{"v":1,"id":"s","op":"generate","params":{"prompt":"\\ud800"}}', "invalid_request", "surrogate"),
    ('{"v":1,"id":"m","op":"load","params":{"model":[1]}}', "invalid_request", "model must be a string"),
    (
        '{"v":1,"id":"t","op":"embed_text","params":{"texts":"abc"}}',
        "invalid_request",
        "texts must be a list",
    ),
    ('{"v":1,"id":"l","op":"classify","params":{"labels":[1]}}', "invalid_request", "labels must be a list"),
    (
        '{"v":1,"id":"f","op":"embed_image","params":{"image":{"base64":"","frame":true}}}',
        "invalid_request",
        "frame",
    ),
]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_pathological_json_gets_a_typed_error_on_every_transport(twin_transports, transport):
    client = twin_transports.clients[transport]
    for raw, code, words in NASTY:
        status, replies = client.replies(raw)
        err = _error(replies)
        assert (err["code"], words in err["message"]) == (code, True), (raw[:60], err)
        if transport == "http":
            assert status == 400
    status, replies = client.replies(b'{"v":1,"id":"u","op":"health","x":"\xff"}')  # not UTF-8
    assert _error(replies)["code"] == "invalid_request"
    _, replies = client.replies({"v": 1, "id": "still-up", "op": "health"})
    assert replies[-2]["result"]["protocol"] == 1


def test_an_error_keeps_the_id_of_a_request_that_had_one(twin_bridge):
    out = call(twin_bridge, '{"v":1,"id":"keep","op":"health","params":{"x":NaN}}')
    assert out[0]["id"] is None  # NaN fails while parsing: nothing was read
    out = call(twin_bridge, '{"v":1,"id":"keep","op":"health","params":{"x":' + "[" * 40 + "]" * 40 + "}}")
    assert out[0]["id"] == "keep" and out[0]["error"]["code"] == "invalid_request"
    out = call(twin_bridge, {"v": 1, "id": "obj", "op": "health", "params": {"x": float("nan")}})
    assert out[0]["id"] == "obj" and "finite" in out[0]["error"]["message"]  # in-process objects too
    out = call(twin_bridge, {"v": 1, "id": "obj", "op": "health", "params": {"x": object()}})
    assert out[0]["error"]["code"] == "invalid_request"


def test_openai_routes_answer_odd_bodies_with_typed_errors(twin_transports):
    s = twin_transports.server
    cases = [
        ("/v1/chat/completions", b"[" * 10000 + b"]" * 10000, "nested deeper"),
        ("/v1/embeddings", b'{"input": NaN}', "not valid JSON"),
        ("/v1/chat/completions", b'{"messages": [], "response_format": true}', "response_format"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role":"user","content":"hi"}], "stream_options": [1]}',
            "stream_options",
        ),
        (
            "/v1/chat/completions",
            b'{"messages":[{"role":"user","content":"hi"}],"temperature":-1,"max_tokens":1}',
            "temperature",
        ),
        (
            "/v1/chat/completions",
            b'{"messages":[{"role":"user","content":"hi"}],"seed":18446744073709551616}',
            "seed",
        ),
    ]
    for path, body, words in cases:
        conn = http.client.HTTPConnection(s.host, s.port, timeout=60)
        conn.request("POST", path, body=body, headers={"Authorization": f"Bearer {s.token}"})
        resp = conn.getresponse()
        err = json.loads(resp.read())["error"]
        conn.close()
        assert (resp.status, err["type"]) == (400, "invalid_request") and words in err["message"], (
            path,
            body,
            err,
        )


# -- generation options: one schema, range-checked ------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature": -0.5}, "temperature must be at least 0"),
        ({"temperature": 9}, "temperature must be at most 5"),
        ({"top_p": 0}, "top_p must be more than 0"),
        ({"top_p": 1.5}, "top_p must be at most 1"),
        ({"top_k": -1}, "top_k must be at least 0"),
        ({"min_p": 2}, "min_p must be at most 1"),
        ({"repeat_penalty": 0}, "repeat_penalty must be more than 0"),
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"max_tokens": True}, "max_tokens must be a whole number"),
        ({"seed": 2**32}, "seed must be at most"),
        ({"seed": -1}, "seed must be at least 0"),
        ({"stop": "END"}, "stop must be a list of strings"),
        ({"stop": ["x"] * 17}, "stop may have at most 16 items"),
        ({"stop": ["x" * 300]}, "at most 256 characters"),
        ({"schema": []}, "schema must be an object"),
    ],
)
def test_generate_options_are_range_checked_naming_the_field(values, message):
    with pytest.raises(UsageError, match=message):
        from_mapping(GenerateOptions, values)
    with pytest.raises(ProtocolError, match=message) as exc:
        generate_options({"prompt": "hi", **values})
    assert exc.value.code == "invalid_request"


def test_good_options_are_unchanged():
    opts = generate_options(
        {"max_tokens": 8, "temperature": 0.7, "top_p": 1, "seed": 7, "stop": ["\n"], "top_k": 0}
    )
    assert (opts.max_tokens, opts.temperature, opts.top_p, opts.seed, opts.stop) == (8, 0.7, 1.0, 7, ["\n"])
    assert GenerateOptions(max_tokens=2) == GenerateOptions(max_tokens=2, top_p=0.95, top_k=64, min_p=0.0)
    with pytest.raises(UsageError):
        GenerateOptions(temperature=-1)  # checked when built directly, too


# -- a fake MedGemma, to hold a generation open ---------------------------------------------------


class SlowModel:
    """Yields one token every ``step_s`` until max_tokens or a cancel (as MedGemma does)."""

    info = {"text": "fake.gguf", "n_ctx": 64, "synthetic": True}
    defaults = {"max_tokens": 512}
    media_marker = None

    def __init__(self, step_s: float = 0.01):
        self.step_s = step_s
        self.options: list[GenerateOptions] = []
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def stream(self, messages, *, images=(), options=None, cancel=None, progress=None, wait=True):
        self.options.append(options)
        with self._lock:
            n = 0
            for n in range(1, (options.max_tokens or 512) + 1):
                if cancel is not None and cancel.is_set():
                    break
                time.sleep(self.step_s)
                yield Piece("x", n)
            finish = "cancelled" if cancel is not None and cancel.is_set() else "length"
            usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
            yield Piece("", n, finish_reason=finish, usage=usage, timings={})


def _generate(rid: str, **params) -> dict:
    return {"v": 1, "id": rid, "op": "generate", "params": {"prompt": "hi", **params}}


def test_the_token_cap_ends_a_generation_with_length():
    model = SlowModel(0)
    bridge = Bridge(Runtime(medgemma=model), limits=Limits(max_request_tokens=5))
    out = call(bridge, _generate("g", max_tokens=1000))
    assert out[-1]["finish_reason"] == "length" and out[-1]["usage"]["completion_tokens"] == 5
    call(bridge, _generate("g2"))  # no max_tokens: the bundle's default (512) is capped too
    assert [o.max_tokens for o in model.options] == [5, 5]
    call(bridge, _generate("g3", max_tokens=3))
    assert model.options[-1].max_tokens == 3


def test_the_token_cap_on_the_real_twin(twin_model):
    bridge = Bridge(Runtime(medgemma=twin_model), limits=Limits(max_request_tokens=2))
    out = call(bridge, _generate("twin", max_tokens=50, stop=[]))
    assert out[-1]["finish_reason"] == "length" and out[-1]["usage"]["completion_tokens"] <= 2, out[-1]


def test_the_wall_clock_limit_ends_a_request_with_a_cancelled_error():
    bridge = Bridge(Runtime(medgemma=SlowModel(0.02)), limits=Limits(request_timeout_s=0.3))
    t0 = time.monotonic()
    out = call(bridge, _generate("slow", max_tokens=1000))
    assert time.monotonic() - t0 < 5
    err = _error(out)
    assert err["code"] == "cancelled" and "0.3 s limit" in err["message"]
    assert out[-1]["finish_reason"] == "cancelled" and not any(r["type"] == "result" for r in out)
    assert out[-1]["usage"]["completion_tokens"] > 0  # what it had generated is reported
    assert call(bridge, {"v": 1, "id": "h", "op": "health"})[-1]["finish_reason"] == "stop"


def test_requests_in_flight_are_capped_but_health_and_cancel_answer():
    bridge = Bridge(Runtime(medgemma=SlowModel(0.02)), limits=Limits(max_active_requests=1))
    first: list[dict] = []
    bridge.submit(json.dumps(_generate("long", max_tokens=500)), first.append)
    deadline = time.monotonic() + 5
    while not any(r.get("event") == "token" for r in first) and time.monotonic() < deadline:
        time.sleep(0.01)
    second: list[dict] = []
    bridge.submit(
        json.dumps({"v": 1, "id": "e", "op": "embed_text", "params": {"texts": ["a"]}}), second.append
    )
    err = _error(second)
    assert (err["code"], err["retry_after"], second[0]["id"]) == ("busy", 1.0, "e")
    health: list[dict] = []
    bridge.submit(json.dumps({"v": 1, "id": "h", "op": "health"}), health.append).result(5)
    assert health[-2]["result"]["active_requests"] == 2  # the generation and this health
    stop: list[dict] = []
    bridge.submit(json.dumps({"v": 1, "id": "c", "op": "cancel", "params": {"target": "long"}}), stop.append)
    assert stop[-2]["result"] == {"target": "long", "found": True}
    while first[-1]["type"] != "done" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first[-1]["finish_reason"] == "cancelled"
    later: list[dict] = []
    bridge.submit(
        json.dumps({"v": 1, "id": "e2", "op": "embed_text", "params": {"texts": ["a"]}}), later.append
    )
    deadline = time.monotonic() + 5
    while (not later or later[-1]["type"] != "done") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _error(later)["code"] == "not_loaded"  # under the cap again: the op ran (no MedSigLIP here)


def test_http_connections_over_the_limit_get_busy(tmp_path):
    bridge = Bridge(Runtime(medgemma=SlowModel(0.02)))
    server = start_server(bridge, tmp_path, limits=Limits(max_connections=1))
    try:
        hold = http.client.HTTPConnection(server.host, server.port, timeout=30)
        body = json.dumps(_generate("hold", max_tokens=300))
        hold.request("POST", "/v1/rpc", body=body, headers={"Authorization": f"Bearer {server.token}"})
        resp = hold.getresponse()
        assert resp.status == 200 and json.loads(resp.readline())["type"] == "event"
        other = http.client.HTTPConnection(server.host, server.port, timeout=30)
        other.request("POST", "/v1/rpc", body=b"{}", headers={"Authorization": f"Bearer {server.token}"})
        busy = other.getresponse()
        assert (busy.status, busy.getheader("retry-after")) == (429, "1")
        assert json.loads(busy.read())["error"]["code"] == "busy"
        bridge.cancel("hold")
        resp.read()
        hold.close()
        other.close()
    finally:
        server.stop()
        server.join(10)


def test_unix_socket_connections_over_the_limit_get_busy(tmp_path):
    from android_bridge.transports import UnixSocketServer

    bridge = Bridge(Runtime())
    path = tmp_path / "b.sock"
    server = UnixSocketServer(path, bridge, max_connections=1)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        first = socket.socket(socket.AF_UNIX)
        first.connect(str(path))
        first.sendall(b'{"v":1,"id":"h","op":"health"}\n')
        f1 = first.makefile("rb")
        assert json.loads(f1.readline())["type"] == "result"
        second = socket.socket(socket.AF_UNIX)
        second.connect(str(path))
        lines = second.makefile("rb").read().splitlines()  # answered and closed
        assert [json.loads(x)["type"] for x in lines] == ["error", "done"]
        assert json.loads(lines[0])["error"]["code"] == "busy"
        f1.readline()
        f1.close()
        first.close()
        deadline = time.monotonic() + 5
        while server.connections and time.monotonic() < deadline:
            time.sleep(0.01)
        third = socket.socket(socket.AF_UNIX)  # a slot is free again
        third.connect(str(path))
        third.sendall(b'{"v":1,"id":"h3","op":"health"}\n')
        assert json.loads(third.makefile("rb").readline())["type"] == "result"
        third.close()
    finally:
        server.shutdown()
        server.server_close()


def test_images_and_pixels_per_request_are_capped(twin_bridge):
    rt = twin_bridge.runtime
    few = Bridge(rt, limits=Limits(max_images=1))
    two = [{"base64": PNG_B64}, {"base64": PNG_B64}]
    err = _error(call(few, {"v": 1, "id": "e", "op": "embed_image", "params": {"images": two}}))
    assert err["code"] == "too_large" and "2 images in one request" in err["message"]
    err = _error(call(few, _generate("g", images=two, max_tokens=1)))
    assert err["code"] == "too_large"
    small = Bridge(rt, limits=Limits(max_request_pixels=100))
    err = _error(
        call(small, {"v": 1, "id": "p", "op": "embed_image", "params": {"image": {"base64": PNG_B64}}})
    )
    assert err["code"] == "too_large" and "in all" in err["message"]
    ok = call(twin_bridge, {"v": 1, "id": "ok", "op": "embed_image", "params": {"images": two}})
    assert ok[-2]["type"] == "result" and len(ok[-2]["result"]["embeddings"]) == 2


def test_dicom_frames_count_as_images(twin_bridge):
    pydicom = pytest.importorskip("pydicom")
    data = (Path(pydicom.__file__).parent / "data" / "test_files" / "SC_rgb_rle_2frame.dcm").read_bytes()
    b64 = base64.b64encode(data).decode()
    frames = [{"base64": b64, "frame": 0}, {"base64": b64, "frame": 1}, {"base64": b64, "frame": 1}]
    bridge = Bridge(twin_bridge.runtime, limits=Limits(max_images=2))
    err = _error(call(bridge, {"v": 1, "id": "d", "op": "embed_image", "params": {"images": frames}}))
    assert err["code"] == "too_large"
    out = call(bridge, {"v": 1, "id": "d2", "op": "embed_image", "params": {"images": frames[:2]}})
    assert out[-2]["type"] == "result"


# -- internal means a bug: logged with the id; a stream always ends -------------------------------------


class BrokenEncoder:
    dim = 2

    def embed_texts(self, texts, cancel=None):
        if texts == ["nan"]:
            return np.full((1, 2), np.nan, dtype=np.float32)
        raise RuntimeError("a bug")


def test_internal_errors_are_bugs_logged_with_the_request_id(caplog):
    bridge = Bridge(Runtime(encoder=BrokenEncoder()))
    with caplog.at_level(logging.ERROR, logger="android_bridge.bridge"):
        out = call(bridge, {"v": 1, "id": "bug-1", "op": "embed_text", "params": {"texts": ["x"]}})
    assert _error(out)["code"] == "internal" and "RuntimeError" in _error(out)["message"]
    assert "bug-1" in caplog.text and "a bug" in caplog.text
    out = call(bridge, {"v": 1, "id": "nan-1", "op": "embed_text", "params": {"texts": ["nan"]}})
    assert _error(out)["code"] == "internal"  # a result that can't be JSON: an error, not a hang-up


def test_handle_never_raises(monkeypatch):
    from android_bridge import params

    bridge = Bridge(Runtime())
    monkeypatch.setattr(params, "check", lambda op, p: 1 / 0)
    out = call(bridge, {"v": 1, "id": "z", "op": "health"})
    assert _error(out)["code"] == "internal" and out[-1]["finish_reason"] == "error"


# -- the settings and the serve flags ---------------------------------------------------------------


def test_limits_are_checked_settings_with_serve_flags():
    from medgemma_edge.serve import _limits, add_serve_parser

    assert ServeSettings().limits == Limits()
    with pytest.raises(UsageError, match="max_connections must be at least 1"):
        Limits(max_connections=0)
    p = argparse.ArgumentParser()
    add_serve_parser(p.add_subparsers())
    args = p.parse_args(
        ["serve", "--request-timeout", "30", "--max-request-tokens", "64", "--max-images", "4"]
    )
    assert _limits(args) == Limits(request_timeout_s=30.0, max_request_tokens=64, max_images=4)
    args = p.parse_args(["serve", "--max-requests", "0"])
    with pytest.raises(UsageError, match="max_active_requests"):
        _limits(args)
