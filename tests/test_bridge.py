"""The bridge protocol over every transport: golden transcripts, cancel, busy, states, shutdown."""

from __future__ import annotations

import base64
import http.client
import io
import json
import threading
from pathlib import Path

import pytest
from fixtures_bridge import IMAGE_PNG, TRANSPORTS, make_bridge, start_server

from android_bridge import transcripts
from android_bridge.bridge import call
from edge.medgemma.settings import MedGemmaSettings

TWIN_TRANSCRIPTS = ("health", "generate", "generate_image", "errors", "medsiglip", "clinic", "load_unload")
LONG = {"prompt": "Describe the chest radiograph findings of lobar pneumonia in detail.", "max_tokens": 300}


def replay(client, name: str, *, http: bool) -> int:
    steps = transcripts.read(transcripts.FIXTURES / f"{name}.jsonl")
    for step in steps:
        status, replies = client.replies(step.body)
        problem = transcripts.check(step.expect, replies)
        assert problem is None, f"{name}: {problem}"
        if http and step.status is not None:
            assert status == step.status, f"{name}: HTTP {status} for {step.body!s:.80}"
    return len(steps)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("name", TWIN_TRANSCRIPTS)
def test_twin_transcripts_over_every_transport(twin_transports, transport, name):
    assert replay(twin_transports.clients[transport], name, http=transport == "http") >= 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_270m_generate_transcript_and_real_text(small_transports, transport):
    client = small_transports.clients[transport]
    replay(client, "generate", http=transport == "http")
    _, replies = client.replies(
        {
            "v": 1,
            "id": f"real-{transport}",
            "op": "generate",
            "params": {"prompt": "Pneumonia is an infection of the", "max_tokens": 12},
        }
    )
    text = "".join(r["text"] for r in replies if r.get("event") == "token")
    assert text == replies[-2]["result"]["text"] and "lung" in text.lower(), text


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cancel_mid_stream_ends_with_done_cancelled(small_transports, transport):
    client = small_transports.clients[transport]
    rid = f"long-{transport}"
    seen, cancel_replies = [], []
    for msg in client.stream({"v": 1, "id": rid, "op": "generate", "params": LONG}):
        seen.append(msg)
        if msg.get("event") == "token" and not cancel_replies:
            # sent while the stream is open: same line stream (stdio, unix), another connection (HTTP)
            cancel = {"v": 1, "id": f"c-{rid}", "op": "cancel", "params": {"target": rid}}
            cancel_replies = client.replies(cancel)[1]
    assert seen[-1]["type"] == "done" and seen[-1]["finish_reason"] == "cancelled"
    assert not [m for m in seen if m["type"] in ("result", "error")]
    assert 1 <= sum(m.get("event") == "token" for m in seen) < 100
    assert cancel_replies[0]["result"] == {"target": rid, "found": True}


def test_two_concurrent_generates_one_busy_neither_corrupted(small_bridge):
    params = {"prompt": "List three causes of chest pain.", "max_tokens": 12}
    call(small_bridge, {"v": 1, "id": "cold", "op": "generate", "params": params})
    # the reference is a warm run: like the ones below it reuses the prompt's KV cache (a cold
    # prefill evaluates the last prompt token in a batch, with other kernels than one token alone,
    # which on some CPUs moves greedy decoding of the 270M model onto another path)
    solo = call(small_bridge, {"v": 1, "id": "solo", "op": "generate", "params": params})
    first_token = threading.Event()
    a_replies: list = []

    def emit(msg):
        a_replies.append(msg)
        if msg.get("event") == "token":
            first_token.set()

    a = threading.Thread(
        target=small_bridge.handle, args=({"v": 1, "id": "a", "op": "generate", "params": params}, emit)
    )
    a.start()
    assert first_token.wait(60)
    b = call(small_bridge, {"v": 1, "id": "b", "op": "generate", "params": params})
    a.join()
    assert b[0]["type"] == "error" and b[0]["error"]["code"] == "busy" and b[0]["error"]["retry_after"] > 0
    assert b[-1]["finish_reason"] == "error"
    assert (
        a_replies[-2]["result"]["text"] == solo[-2]["result"]["text"]
    )  # greedy: identical when not disturbed
    after = call(small_bridge, {"v": 1, "id": "b2", "op": "generate", "params": params})
    assert after[-2]["result"]["text"] == solo[-2]["result"]["text"]


def test_loading_answers_retry_after_then_ready(twin_llm_bundle, tmp_path):
    bridge = make_bridge(bundle=twin_llm_bundle, medgemma_settings=MedGemmaSettings(n_ctx=256))
    health = call(bridge, {"v": 1, "id": "h0", "op": "health"})[0]["result"]
    assert health["models"]["medgemma"]["state"] == "uninitialized"
    assert (
        health["models"]["medsiglip"]["state"] == "uninitialized" and not health["capabilities"]["medsiglip"]
    )
    gate, real_open = threading.Event(), bridge.runtime.opener
    bridge.runtime.opener = lambda *a: (gate.wait(60), real_open(*a))[1]  # hold the load open
    server = start_server(bridge, tmp_path)
    loader = bridge.preload(["medgemma"])
    early = call(bridge, {"v": 1, "id": "g0", "op": "generate", "params": {"prompt": "hi", "max_tokens": 2}})
    assert early[0]["error"]["code"] == "loading" and early[0]["error"]["retry_after"] > 0
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    conn.request(
        "POST",
        "/v1/rpc",
        body=json.dumps({"v": 1, "id": "g0h", "op": "generate", "params": {}}),
        headers={"Authorization": f"Bearer {server.token}"},
    )
    resp = conn.getresponse()
    assert resp.status == 503 and resp.getheader("retry-after") == "1"
    assert json.loads(resp.read().splitlines()[0])["error"]["code"] == "loading"
    states = call(bridge, {"v": 1, "id": "h1", "op": "health"})[0]["result"]["models"]
    assert states["medgemma"]["state"] == "loading"
    gate.set()
    loader.join(60)
    assert (
        call(bridge, {"v": 1, "id": "h1", "op": "health"})[0]["result"]["models"]["medgemma"]["state"]
        == "ready"
    )
    ok = call(bridge, {"v": 1, "id": "g1", "op": "generate", "params": {"prompt": "hi", "max_tokens": 2}})
    assert ok[-1]["finish_reason"] in ("stop", "length")
    failed = call(bridge, {"v": 1, "id": "l1", "op": "load", "params": {"model": "medsiglip"}})
    assert [m.get("state") for m in failed if m.get("event") == "state"] == ["loading", "error"]
    assert failed[-2]["error"]["code"] == "invalid_request"  # the bundle has no medsiglip component
    models = call(bridge, {"v": 1, "id": "h2", "op": "health"})[0]["result"]["models"]
    assert models["medsiglip"]["state"] == "error" and "medsiglip" in models["medsiglip"]["error"]
    unloaded = call(bridge, {"v": 1, "id": "u1", "op": "unload", "params": {"model": "medgemma"}})
    assert unloaded[0]["result"]["state"] == "uninitialized"
    assert (
        call(bridge, {"v": 1, "id": "g2", "op": "generate", "params": {"prompt": "hi"}})[0]["error"]["code"]
        == "not_loaded"
    )
    server.stop()
    server.join(10)
    bridge.shutdown(grace_s=1)


def test_search_similar_over_a_case_index(twin_bridge, medsiglip_bundle, tmp_path):
    from edge.cases.index import CaseIndex

    encoder = twin_bridge.runtime.slots["medsiglip"].model
    rng = __import__("numpy").random.default_rng(3)
    from PIL import Image

    for i in range(3):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8")).save(tmp_path / f"case{i}.png")
    with CaseIndex.open(tmp_path / "index", encoder=encoder, create=True) as index:
        index.add([tmp_path], encoder=encoder)
    bridge = make_bridge(
        bundle=twin_bridge.runtime.bundle_path,
        medsiglip_bundle=medsiglip_bundle,
        index_dir=tmp_path / "index",
        encoder=encoder,
    )
    query = base64.b64encode((tmp_path / "case1.png").read_bytes()).decode()
    by_image = call(
        bridge, {"v": 1, "id": "s1", "op": "search_similar", "params": {"image": {"base64": query}, "k": 2}}
    )
    matches = by_image[-2]["result"]["matches"]
    assert len(matches) == 2 and matches[0]["content"].endswith(".png") and matches[0]["score"] > 0.999
    assert matches[0]["score"] >= matches[1]["score"]
    by_text = call(
        bridge, {"v": 1, "id": "s2", "op": "search_similar", "params": {"text": "opacity", "k": 3}}
    )
    assert len(by_text[-2]["result"]["matches"]) == 3
    bad_k = call(bridge, {"v": 1, "id": "s3", "op": "search_similar", "params": {"text": "x", "k": 0}})
    assert bad_k[0]["error"]["code"] == "invalid_request"
    (tmp_path / "case2.png").unlink()  # a case whose file is gone still comes back, without a picture
    thumbs = call(
        bridge,
        {"v": 1, "id": "s4", "op": "search_similar", "params": {"text": "opacity", "k": 3, "thumbnails": 32}},
    )[-2]["result"]["matches"]
    by_name = {Path(m["content"]).name: m["thumbnail"] for m in thumbs}
    assert by_name["case2.png"] is None and by_name["case0.png"].startswith("data:image/png;base64,")
    small = Image.open(io.BytesIO(base64.b64decode(by_name["case0.png"].split(",", 1)[1])))
    assert max(small.size) == 32
    bad_side = call(
        bridge, {"v": 1, "id": "s5", "op": "search_similar", "params": {"text": "x", "thumbnails": 4096}}
    )
    assert bad_side[0]["error"]["code"] == "invalid_request"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_shutdown_over_every_transport(twin_model, twin_llm_bundle, tmp_path, transport):
    from fixtures_bridge import Transports

    bridge = make_bridge(bundle=twin_llm_bundle, medgemma=twin_model)
    t = Transports(bridge, tmp_path)
    replies = t.clients[transport].replies({"v": 1, "id": "bye", "op": "shutdown"})[1]
    assert replies[0]["result"]["shutting_down"] is True and replies[-1]["finish_reason"] == "stop"
    refused = call(bridge, {"v": 1, "id": "late", "op": "generate", "params": {"prompt": "hi"}})
    assert refused[0]["error"]["code"] == "not_loaded" and "shutting down" in refused[0]["error"]["message"]
    t.server.join(15)
    assert not t.server.thread.is_alive()  # the shutdown op stops the HTTP server too
    t.close()
    assert not twin_model.busy and twin_model.llama is not None  # a model handed in stays open


def test_unix_socket_is_private(twin_transports):
    assert (twin_transports.unix.path.stat().st_mode & 0o777) == 0o600


def test_line_transport_refuses_an_oversized_line(twin_bridge):
    import io

    from android_bridge.transports import serve_lines

    out = io.BytesIO()
    serve_lines(
        twin_bridge,
        io.BytesIO(b"x" * 5000 + b"\n" + json.dumps({"v": 1, "id": "ok", "op": "health"}).encode() + b"\n"),
        out,
        max_line_bytes=1000,
    )
    replies = [json.loads(line) for line in out.getvalue().splitlines()]
    assert replies[0]["error"]["code"] == "too_large" and replies[1]["type"] == "done"
    assert {r["id"] for r in replies[2:]} == {"ok"} and replies[-1]["finish_reason"] == "stop"


def test_importing_the_bridge_pulls_in_no_server_stack_or_torch():
    import subprocess
    import sys

    code = (
        "import sys, android_bridge, android_bridge.bridge, android_bridge.transports, medgemma_edge.serve;"
        "bad = [m for m in ('torch', 'transformers', 'starlette', 'uvicorn') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == ""


def test_prepare_image_encodes_ahead_and_generate_hits_the_cache(twin_bridge):
    from PIL import Image

    rng = __import__("numpy").random.default_rng(11)
    buf = io.BytesIO()
    Image.fromarray((rng.random((48, 48, 3)) * 255).astype("uint8")).save(buf, format="PNG")
    image = {"base64": base64.b64encode(buf.getvalue()).decode()}
    first = call(twin_bridge, {"v": 1, "id": "p1", "op": "prepare_image", "params": {"images": [image]}})
    progress = [(m["done"], m["total"]) for m in first if m.get("event") == "progress"]
    assert progress[0] == (0, 1) and progress[-1] == (1, 1) and all(m["stage"] == "image" for m in first[:-2])
    assert (
        first[-2]["result"]["images"][0]["cached"] is False
        and first[-1]["timings"]["image_cache_misses"] == 1
    )
    again = call(twin_bridge, {"v": 1, "id": "p2", "op": "prepare_image", "params": {"image": image}})
    assert again[-2]["result"]["images"] == [{"cached": True, "encode_s": 0.0}]
    asked = call(
        twin_bridge,
        {
            "v": 1,
            "id": "g",
            "op": "generate",
            "params": {"prompt": "Describe.", "images": [image], "max_tokens": 2},
        },
    )
    assert asked[-1]["timings"]["image_cache_hits"] == 1 and asked[-1]["timings"]["image_cache_misses"] == 0
    bad = call(
        twin_bridge, {"v": 1, "id": "p3", "op": "prepare_image", "params": {"images": [{"base64": "aGk="}]}}
    )
    assert bad[0]["error"]["code"] == "invalid_request" and bad[-1]["finish_reason"] == "error"


def test_prepare_image_is_busy_while_generating_and_refused_by_a_text_model(twin_bridge, small_bridge):
    image = {"base64": base64.b64encode(IMAGE_PNG).decode()}
    first_token = threading.Event()
    replies: list = []

    def emit(msg):
        replies.append(msg)
        if msg.get("event") == "token":
            first_token.set()

    long = {"v": 1, "id": "long", "op": "generate", "params": {"prompt": "Describe.", "max_tokens": 400}}
    runner = threading.Thread(target=twin_bridge.handle, args=(long, emit))
    runner.start()
    try:
        assert first_token.wait(60)
        busy = call(twin_bridge, {"v": 1, "id": "p", "op": "prepare_image", "params": {"image": image}})
        assert busy[0]["error"]["code"] == "busy" and busy[0]["error"]["retry_after"] > 0
    finally:
        twin_bridge.cancel("long")
        runner.join(60)
    assert replies[-1]["finish_reason"] == "cancelled"
    text_only = call(small_bridge, {"v": 1, "id": "p", "op": "prepare_image", "params": {"image": image}})
    assert text_only[0]["error"]["code"] == "invalid_request" and "image" in text_only[0]["error"]["message"]


@pytest.mark.parametrize(
    "options, says",
    [
        ({"n_ctx": True}, "n_ctx must be a whole number"),
        ({"n_ctx": 8}, "n_ctx must be at least 16"),
        ({"kv_type": "q2"}, "kv_type must be one of"),
        ({"flash_attn": 1}, "flash_attn must be true or false"),
        ({"check_memory": False}, "unknown load option for medgemma: check_memory"),
        ([1, 2], "must be an object"),
    ],
)
def test_load_options_are_checked_against_the_settings_before_loading(twin_llm_bundle, options, says):
    bridge = make_bridge(bundle=twin_llm_bundle)
    out = call(
        bridge, {"v": 1, "id": "l1", "op": "load", "params": {"model": "medgemma", "options": options}}
    )
    assert out[0]["type"] == "error" and out[0]["error"]["code"] == "invalid_request", out
    assert says in out[0]["error"]["message"]
    assert out[-1]["type"] == "done" and out[-1]["finish_reason"] == "error"
    assert bridge.runtime.slots["medgemma"].state == "uninitialized"  # nothing was loaded
