"""Fuzzing the running server with hypothesis: nothing a client sends gets an untyped answer.

Generated protocol requests (random ops, params, types, nesting, ids, unicode), raw request
text (broken JSON, NaN, deep nesting, bad UTF-8), image bytes (truncated and mutated PNG, JPEG
and DICOM from pydicom's samples) and OpenAI-route bodies, sent to the session's real servers
(``twin_transports``: HTTP on port 0, stdio, a Unix socket and in-process, over the tiny twin and
MedSigLIP). The property: every reply is a valid result or a typed error (a code of
``protocol.ERROR_CODES``, never ``internal``, never a bare 500 or a non-JSON body), every stream
ends with exactly one ``done``, and ``health`` still answers afterwards.

Profiles (``HYPOTHESIS_PROFILE``): ``ci`` (default; derandomized, no example database, a few
hundred examples in all) and ``long`` (``make fuzz``: ~25x the examples, random, with a database
in .hypothesis/ so a failure found once is replayed first next time).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import string
from pathlib import Path

import pytest
from fixtures_bridge import IMAGE_PNG, TRANSPORTS, body_of

from android_bridge.protocol import ERROR_CODES, HTTP_STATUS, OPS

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile(
    "ci", max_examples=100, derandomize=True, database=None, deadline=None, suppress_health_check=_SLOW
)
settings.register_profile("long", max_examples=2500, deadline=None, suppress_health_check=_SLOW)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def examples(share: float) -> settings:
    """The profile, with ``share`` of its examples for one test (so the CI total stays small)."""
    return settings(PROFILE, max_examples=max(5, int(PROFILE.max_examples * share)))


# -- what a reply may be ---------------------------------------------------------------------------


def check_stream(replies: list[dict], rid, *, status: int | None = None) -> None:
    """The protocol's promise for one request's replies."""
    assert replies, "no reply at all"
    assert [r["type"] for r in replies].count("done") == 1 and replies[-1]["type"] == "done", replies[-3:]
    for r in replies:
        assert r["v"] == 1 and r["type"] in ("event", "result", "error", "done"), r
        assert r["id"] in (rid, None), (r["id"], rid)
    ends = [r for r in replies if r["type"] in ("result", "error")]
    assert len(ends) <= 1, ends
    errors = [r["error"] for r in replies if r["type"] == "error"]
    for err in errors:
        assert err["code"] in ERROR_CODES and err["code"] != "internal", err
        assert isinstance(err["message"], str) and err["message"], err
    assert replies[-1]["finish_reason"] in ("stop", "length", "cancelled", "error")
    if status is not None:
        first = replies[0]
        want = HTTP_STATUS[first["error"]["code"]] if first["type"] == "error" else 200
        assert status == want, (status, first)


def send(transports, transport: str, body) -> list[dict]:
    """One request over ``transport``; over HTTP the status and the NDJSON body are checked too."""
    if transport != "http":
        rid = _rid(body)
        _, replies = transports.clients[transport].replies(body)
        check_stream(replies, rid)
        return replies
    server = transports.server
    status, headers, raw = post(server, "/v1/rpc", body_of(body))
    if status in (401, 413):  # answered by the server before the protocol: a JSON error body
        err = json.loads(raw)["error"]
        assert err["code"] in ("unauthorized", "too_large"), err
        return []
    assert headers.get("content-type", "").startswith("application/x-ndjson"), (status, raw[:200])
    replies = [json.loads(line) for line in raw.splitlines() if line.strip()]
    check_stream(replies, _rid(body), status=status)
    return replies


def _rid(body):
    from android_bridge.protocol import request_id

    return request_id(body_of(body))


def post(server, path: str, data: bytes, *, auth: bool = True) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
    try:
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {server.token}"
        conn.request("POST", path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def healthy(transports, transport: str) -> None:
    replies = send(transports, transport, {"v": 1, "id": "fuzz-health", "op": "health"})
    assert replies[-2]["type"] == "result" and replies[-2]["result"]["protocol"] == 1


# -- strategies ----------------------------------------------------------------------------------

ID_CHARS = string.ascii_letters + string.digits + "._:-"
ids = st.one_of(
    st.text(ID_CHARS, min_size=1, max_size=20).map(lambda s: "fz-" + s),  # valid (prefixed: unique-ish)
    st.none(),
    st.integers(),
    st.text(max_size=10),
    st.just("x" * 200),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# values at the edges of what params take: out of range, huge, odd unicode, not JSON-able floats
edge_values = st.one_of(
    st.sampled_from([0, -1, 2**31, 2**32, 2**63, 2**64, -(2**63) - 1, 1e308, -0.0, 5e-324, "", " ", "\x00"]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=8),
    st.just("\ud800"),  # a lone surrogate, as an in-process caller or a \\ud800 escape gives it
    st.lists(st.integers(), max_size=3),
)
# every param name some op reads, and the generation options
PARAM_NAMES = [
    "model", "options", "prompt", "system", "messages", "images", "image", "texts", "text", "labels",
    "label_set", "k", "thumbnails", "target", "max_tokens", "temperature", "top_p", "top_k", "min_p",
    "repeat_penalty", "seed", "stop", "schema", "frame",
]  # fmt: skip
OPTIONS = ["max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "stop", "schema"]
OP_PARAMS = {  # what each op reads (PROTOCOL.md), so most generated params reach the op's code
    "load": ["model", "options"],
    "generate": ["prompt", "system", "messages", "images", *OPTIONS],
    "prepare_image": ["images", "image"],
    "embed_image": ["images", "image"],
    "embed_text": ["texts", "text"],
    "classify": ["image", "labels", "label_set"],
    "search_similar": ["image", "text", "k", "thumbnails"],
    "cancel": ["target"],
}
FUZZ_OPS = [op for op in OPS if op not in ("shutdown", "unload")]  # keep the shared server up and loaded


def _image_bytes() -> list[bytes]:
    from PIL import Image

    out = [IMAGE_PNG]
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (120, 30, 200)).save(buf, "JPEG")
    out.append(buf.getvalue())
    try:
        import pydicom
    except ImportError:
        return out
    samples = Path(pydicom.__file__).parent / "data" / "test_files"
    for name in (
        "CT_small.dcm",
        "MR_small.dcm",
        "SC_rgb_rle_2frame.dcm",
        "rtdose.dcm",
        "SC_rgb_small_odd.dcm",
    ):
        if (samples / name).is_file():
            out.append((samples / name).read_bytes())
    return out


IMAGES = _image_bytes()


@st.composite
def image_data(draw) -> bytes:
    """A sample image, whole or truncated or with bytes flipped/inserted (mostly in the header)."""
    data = bytearray(draw(st.sampled_from(IMAGES)))
    how = draw(st.sampled_from(["whole", "truncate", "flip", "insert", "flip"]))
    if how == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how in ("flip", "insert"):
        for _ in range(draw(st.integers(1, 8))):
            at = draw(st.integers(0, min(len(data) - 1, draw(st.sampled_from([64, 400, len(data) - 1])))))
            byte = draw(st.integers(0, 255))
            if how == "flip":
                data[at] = byte
            else:
                data[at:at] = bytes([byte]) * draw(st.integers(1, 64))
    return bytes(data)


def image_source(data: bytes, draw) -> object:
    b64 = base64.b64encode(data).decode()
    kind = draw(st.sampled_from(["base64", "url", "string", "frame"]))
    if kind == "base64":
        return {"base64": b64}
    if kind == "url":
        return {"url": "data:image/png;base64," + b64}
    if kind == "string":
        return "data:application/dicom;base64," + b64
    return {"base64": b64, "frame": draw(st.one_of(st.integers(-2, 4), st.booleans(), st.text(max_size=3)))}


@st.composite
def protocol_requests(draw) -> dict:
    """A request of a random op with random params: mostly well-formed envelopes (so the ops run),
    params drawn from the names ops read with values of any type; generations stay tiny."""
    op = draw(st.sampled_from(FUZZ_OPS) | st.text(max_size=12))
    req: dict = {"v": draw(st.sampled_from([1, 1, 1, 1, 2, "1", None])), "id": draw(ids), "op": op}
    own = OP_PARAMS.get(op, [])
    names = st.sampled_from(own) | st.sampled_from(PARAM_NAMES) if own else st.sampled_from(PARAM_NAMES)
    params = draw(st.dictionaries(names, values | edge_values, max_size=5))
    if op in ("generate", "prepare_image", "embed_image", "classify", "search_similar") and draw(
        st.booleans()
    ):
        src = image_source(draw(image_data()), draw)
        params["images" if op in ("generate", "prepare_image", "embed_image") else "image"] = (
            [src] if op != "classify" and op != "search_similar" else src
        )
        if op == "generate":
            params.setdefault("prompt", "Describe.")
    if op == "generate":
        if draw(st.booleans()):
            params.setdefault("prompt", draw(st.text(min_size=1, max_size=40)))
        params["max_tokens"] = draw(st.one_of(st.integers(1, 3), values))  # never a long answer
        if params.get("max_tokens") is None or not isinstance(params["max_tokens"], int):
            params["max_tokens"] = draw(st.sampled_from([1, 2, "2", -1, 0, 10**9, 2.5]))
    if op == "load":
        params.pop("options", None) if draw(st.booleans()) else None
    if draw(st.integers(0, 9)) > 0:
        req["params"] = params
    else:
        req["params"] = draw(values)
    return req


nasty_text = st.one_of(
    st.sampled_from(
        [
            "[" * 10000 + "]" * 10000,
            '{"v":1,"id":"deep","op":"health","params":{"x":' + "[" * 5000 + "]" * 5000 + "}}",
            '{"v":1,"id":"nan","op":"generate","params":{"prompt":"hi","temperature":NaN,"max_tokens":1}}',
            '{"v":1,"id":"inf","op":"generate","params":{"prompt":"hi","top_p":Infinity,"max_tokens":1}}',
            '{"v":1,"id":"big","op":"generate","params":{"prompt":"hi","temperature":1e999,"max_tokens":1}}',
            '{"v":1,"id":"sur","op":"generate","params":{"prompt":"\\ud800","max_tokens":1}}',
            '{"v":1,"id":"digits","op":"search_similar","params":{"k":' + "9" * 5000 + "}}",
            '{"v":1,"id":"dup","op":"health","id":"dup2"}',
            "\ufeff" + '{"v":1,"id":"bom","op":"health"}',
            '{"v":1,"id":"seed","op":"generate","params":{"prompt":"hi","seed":'
            + str(2**64)
            + ',"max_tokens":1}}',
            '{"v":1,"id":"topk","op":"generate","params":{"prompt":"hi","top_k":'
            + str(2**40)
            + ',"max_tokens":1}}',
            "null",
            "[]",
            '"text"',
        ]
    ),
    st.text(max_size=60).map(lambda s: '{"v":1,"id":"t","op":"health","params":' + s + "}"),
    st.text(max_size=80),
)
nasty_bytes = st.one_of(
    st.binary(max_size=80).filter(lambda b: b"\n" not in b and b.strip()),
    st.sampled_from([b'{"v":1,"id":"u","op":"health","params":{"x":"\xff\xfe"}}', b"\xff\xfe{", b"\xc0\x80"]),
)


@st.composite
def chat_bodies(draw) -> dict:
    content = st.one_of(
        st.text(max_size=30),
        st.lists(
            st.one_of(
                st.fixed_dictionaries(
                    {"type": st.just("text"), "text": st.one_of(st.text(max_size=20), values)}
                ),
                st.fixed_dictionaries(
                    {
                        "type": st.just("image_url"),
                        "image_url": st.one_of(
                            image_data().map(
                                lambda d: {"url": "data:image/png;base64," + base64.b64encode(d).decode()}
                            ),
                            values,
                        ),
                    }
                ),
                values,
            ),
            max_size=3,
        ),
        values,
    )
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", 3]), "content": content}
    )
    body = draw(
        st.fixed_dictionaries(
            {"messages": st.one_of(st.lists(message, min_size=1, max_size=3), values)},
            optional={
                "temperature": values,
                "top_p": values,
                "seed": values,
                "stop": values,
                "stream": st.one_of(st.booleans(), values),
                "stream_options": st.one_of(st.just({"include_usage": True}), values),
                "response_format": st.one_of(
                    st.just({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}), values
                ),
                "model": values,
            },
        )
    )
    body["max_tokens"] = draw(st.one_of(st.integers(1, 2), st.sampled_from([0, -5, "3", 1.5, None])))
    return body


# -- the properties ------------------------------------------------------------------------------------


def _num(v, lo, hi, *, above=False, whole=False) -> bool:
    if isinstance(v, bool) or not isinstance(v, int if whole else (int, float)):
        return False
    return math.isfinite(v) and (v > lo if above else v >= lo) and v <= hi


OPTION_OK = {  # PROTOCOL.md's documented ranges, written out again as the test's oracle
    "max_tokens": lambda v: _num(v, 1, 10**6, whole=True),
    "temperature": lambda v: _num(v, 0, 5),
    "top_p": lambda v: _num(v, 0, 1, above=True),
    "top_k": lambda v: _num(v, 0, 10**6, whole=True),
    "min_p": lambda v: _num(v, 0, 1),
    "repeat_penalty": lambda v: _num(v, 0, 10, above=True),
    "seed": lambda v: _num(v, 0, 2**32 - 2, whole=True),
    "stop": lambda v: (
        isinstance(v, list) and len(v) <= 16 and all(isinstance(x, str) and len(x) <= 256 for x in v)
    ),
    "schema": lambda v: isinstance(v, dict),
}


@examples(1.5)
@given(req=protocol_requests(), transport=st.sampled_from(TRANSPORTS))
def test_generated_requests_get_typed_replies(twin_transports, req, transport):
    replies = send(twin_transports, transport, req)
    params = req.get("params")
    if req["op"] == "generate" and isinstance(params, dict):
        bad = [k for k, ok in OPTION_OK.items() if params.get(k) is not None and not ok(params[k])]
        assert not bad or not any(r["type"] == "result" for r in replies), f"accepted out-of-range {bad}"


@examples(0.6)
@given(text=st.one_of(nasty_text, nasty_bytes), transport=st.sampled_from(TRANSPORTS))
def test_raw_request_text_gets_typed_replies(twin_transports, text, transport):
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if transport != "http" and (b"\n" in data or not data.strip()):
        return  # a line transport reads one request per line
    if transport == "inproc":
        data = data  # Bridge.handle takes the bytes as they are
    send(twin_transports, transport, data)


@examples(0.8)
@given(
    data=image_data(),
    op=st.sampled_from(["embed_image", "classify", "prepare_image", "generate"]),
    st_=st.data(),
)
def test_mutated_images_get_typed_replies(twin_transports, data, op, st_):
    src = image_source(data, st_.draw)
    params: dict = {"image": src} if op == "classify" else {"images": [src]}
    if op == "generate":
        params |= {"prompt": "Describe.", "max_tokens": 1}
    transport = st_.draw(st.sampled_from(TRANSPORTS))
    replies = send(twin_transports, transport, {"v": 1, "id": f"img-{op}", "op": op, "params": params})
    codes = {r["error"]["code"] for r in replies if r["type"] == "error"}
    assert codes <= {"invalid_request", "too_large"}, codes


@examples(0.3)
@given(data=image_data(), frame=st.one_of(st.none(), st.integers(-1, 3).map(str), st.text(max_size=4)))
def test_mutated_images_on_the_preview_route(twin_transports, data, frame):
    from urllib.parse import quote

    path = "/v1/preview" + (f"?frame={quote(frame)}" if frame is not None else "")
    status, headers, raw = post(twin_transports.server, path, data)
    body = json.loads(raw)
    if status == 200:
        assert body["image"].startswith("data:image/png;base64,")
    else:
        assert body["error"]["code"] in ("invalid_request", "too_large"), body
        assert status == HTTP_STATUS[body["error"]["code"]]


def _check_openai(status: int, headers: dict, raw: bytes) -> None:
    if status == 200 and headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", raw[-200:]
        for e in events[:-1]:
            obj = json.loads(e)
            if "error" in obj:
                assert obj["error"]["type"] in ERROR_CODES and obj["error"]["type"] != "internal", obj
        return
    body = json.loads(raw)  # never a bare text 500
    if status == 200:
        assert body["object"] in ("chat.completion", "list"), body
    else:
        err = body["error"]
        assert err["type"] in ERROR_CODES and err["type"] != "internal", body
        assert status == HTTP_STATUS[err["type"]], (status, body)


@examples(0.5)
@given(body=chat_bodies())
def test_generated_chat_completions_get_typed_replies(twin_transports, body):
    _check_openai(*post(twin_transports.server, "/v1/chat/completions", json.dumps(body).encode()))


@examples(0.3)
@given(
    body=st.one_of(
        st.fixed_dictionaries(
            {
                "input": st.one_of(
                    st.text(max_size=30),
                    st.lists(
                        st.one_of(
                            st.text(max_size=20),
                            image_data().map(
                                lambda d: "data:image/png;base64," + base64.b64encode(d).decode()
                            ),
                        ),
                        max_size=3,
                    ),
                    values,
                )
            },
            optional={
                "encoding_format": st.one_of(st.sampled_from(["float", "base64"]), values),
                "model": values,
            },
        ),
        values,
    )
)
def test_generated_embedding_bodies_get_typed_replies(twin_transports, body):
    _check_openai(*post(twin_transports.server, "/v1/embeddings", json.dumps(body).encode()))


@examples(0.2)
@given(raw=st.one_of(nasty_text.map(lambda s: s.encode("utf-8", "surrogatepass")), nasty_bytes))
def test_raw_bodies_on_the_openai_routes(twin_transports, raw):
    for path in ("/v1/chat/completions", "/v1/embeddings"):
        _check_openai(*post(twin_transports.server, path, raw))


def test_health_answers_on_every_transport_after_the_fuzzing(twin_transports):
    for transport in TRANSPORTS:
        healthy(twin_transports, transport)
    assert twin_transports.bridge.active == 0
