"""Clinic-server mode (``serve --lan``): TLS with a pinned certificate, pairing, device tokens,
the fair queue, rate limits and the audit log, over a real HTTPS server on loopback.

MedGemma here is :class:`EchoModel`, a fake that answers with the prompt's words and can be held
at its first token, so the queue's order and cancel-while-queued are decided by the test, not by
timing. One more test runs the server on a second address in a network namespace it makes.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import queue
import shutil
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from android_bridge.bridge import Bridge, call
from android_bridge.http.server import RunningServer
from android_bridge.lan import client
from android_bridge.lan.limits import FIELDS, AuditLog, RateLimiter
from android_bridge.lan.pairing import PairingCodes, PairingRefused, PairingThrottled
from android_bridge.lan.queue import FairQueue
from android_bridge.lan.tls import ensure_certificate, normalize_fingerprint
from android_bridge.runtime import Runtime
from android_bridge.settings import LanSettings, ServeSettings
from edge.errors import Busy, InputError
from edge.medgemma.generation import Piece

SECRET = "Patient Jane Roe 1961 chest pain"  # must never reach the audit log


class EchoModel:
    """A fake MedGemma: answers with the prompt's words, one token each; held at the start of a
    generation while ``gate`` is clear (a cancel still ends it). ``order`` lists the prompts in
    the order they ran; a second generation at once raises Busy, as MedGemma's does."""

    info = {"text": "echo.gguf", "n_ctx": 64, "synthetic": True}
    defaults = {"max_tokens": 64}
    media_marker = None

    def __init__(self, *, stuck: bool = False):
        self.stuck = stuck  # held by the gate even when cancelled (a slow first token)
        self.gate = threading.Event()
        self.gate.set()
        self.order: list[str] = []
        self.running = threading.Event()
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def stream(self, messages, *, images=(), options=None, cancel=None, progress=None, wait=True):
        if not self._lock.acquire(blocking=wait):
            raise Busy("MedGemma is generating")
        try:
            prompt = messages[-1]["content"]
            self.order.append(prompt)
            self.running.set()
            while not self.gate.wait(0.01):
                if cancel is not None and cancel.is_set() and not self.stuck:
                    break
            words = prompt.split()
            n = 0
            for n, word in enumerate(words, 1):
                if cancel is not None and cancel.is_set():
                    break
                yield Piece(word + " ", n)
            finish = "cancelled" if cancel is not None and cancel.is_set() else "stop"
            usage = {"prompt_tokens": len(words), "completion_tokens": n, "total_tokens": len(words) + n}
            yield Piece("", n, finish_reason=finish, usage=usage, timings={})
        finally:
            self.running.clear()
            self._lock.release()


def start_lan(tmp: Path, model=None, host: str = "127.0.0.1", **lan) -> RunningServer:
    """A clinic server on ``host``, port 0, over :class:`EchoModel` (``lan``: LanSettings fields)."""
    bridge = Bridge(Runtime(medgemma=model or EchoModel()))
    settings = ServeSettings(
        host=host, data_dir=tmp / "data", lan=LanSettings(**lan), endpoint_file=tmp / "endpoint.json"
    )
    server = RunningServer(settings, bridge).start()
    server.write_endpoint(tmp / "endpoint.json")
    return server


def stop(server: RunningServer) -> None:
    server.stop()
    server.join(10)


@pytest.fixture(scope="module")
def lan(tmp_path_factory):
    server = start_lan(tmp_path_factory.mktemp("lan"), rate=1000)
    yield server
    stop(server)


def admin(server, op, **params):
    return client.result(server.url, server.fingerprint, server.token, op, params)


def pair(server, name="tablet") -> tuple[str, str]:
    """A newly paired device: (token, device_id)."""
    code = admin(server, "lan_pair_code")["code"]
    reply = client.pair(server.url, server.fingerprint, code, name)
    return reply["token"], reply["device_id"]


def request(server, method, path, body=b"", token=None, headers=None):
    """(status, headers, parsed JSON or raw bytes) over HTTPS pinned to the server's certificate."""
    conn = client.connection(server.url, server.fingerprint, timeout=30)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        data = json.loads(raw)
    except ValueError:
        data = raw
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def gen(rid: str, prompt: str) -> dict:
    return {"v": 1, "id": rid, "op": "generate", "params": {"prompt": prompt}}


class Stream(threading.Thread):
    """One ``POST /v1/rpc`` read as it streams; ``next(pred)`` waits for a reply matching ``pred``."""

    def __init__(self, server, token, req):
        super().__init__(daemon=True)
        self.server, self.token, self.req = server, token, req
        self.q: queue.Queue = queue.Queue()
        self.replies: list[dict] = []
        self.status = None
        self.start()

    def run(self) -> None:
        conn = client.connection(self.server.url, self.server.fingerprint, timeout=60)
        try:
            conn.request(
                "POST",
                "/v1/rpc",
                body=json.dumps(self.req).encode(),
                headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            self.status = resp.status
            for line in resp:
                if line.strip():
                    msg = json.loads(line)
                    self.replies.append(msg)
                    self.q.put(msg)
        finally:
            conn.close()
            self.q.put(None)

    def next(self, pred, timeout=10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            assert msg is not None, f"the stream ended first: {self.replies}"
            if pred(msg):
                return msg

    def finish(self, timeout=20.0) -> list[dict]:
        self.join(timeout)
        assert not self.is_alive()
        return self.replies


def queued(msg) -> bool:
    return msg["type"] == "event" and msg["event"] == "queued"


def text_of(replies) -> str:
    return next(r["result"]["text"] for r in replies if r["type"] == "result")


# -- TLS and the pin ------------------------------------------------------------------------------


def test_the_pinned_client_connects_and_unpinned_or_wrong_pins_refuse(lan):
    assert lan.url.startswith("https://127.0.0.1:")
    health = client.result(lan.url, lan.fingerprint, lan.token, "health")
    assert health["lan"]["fingerprint"] == lan.fingerprint
    assert (
        health["capabilities"]["concurrency"] == "queue" and "https" in health["capabilities"]["transports"]
    )
    # the pin is the SHA-256 of the DER certificate the server shows
    der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", lan.port)))
    assert hashlib.sha256(der).hexdigest() == lan.fingerprint == lan.bridge.lan.cert.fingerprint
    # the same pin in a person's spelling
    spelled = ":".join(lan.fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()
    assert client.result(lan.url, spelled, lan.token, "health")["protocol"] == 1
    wrong = "0" * 64
    with pytest.raises(client.PinMismatch):
        client.result(lan.url, wrong, lan.token, "health")
    # an unpinned client checking the system's CAs refuses the self-signed certificate
    conn = http.client.HTTPSConnection(
        "127.0.0.1", lan.port, timeout=10, context=ssl.create_default_context()
    )
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.request("GET", "/v1/models")
    conn.close()
    # a client that trusts the certificate itself verifies it, host name included (its SAN)
    ctx = ssl.create_default_context(cafile=str(lan.bridge.lan.cert.cert))
    conn = http.client.HTTPSConnection("127.0.0.1", lan.port, timeout=10, context=ctx)
    conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {lan.token}"})
    assert conn.getresponse().status == 200
    conn.close()
    # plain HTTP to the TLS port gets nothing useful
    plain = http.client.HTTPConnection("127.0.0.1", lan.port, timeout=10)
    try:
        plain.request("GET", "/v1/models")
        assert plain.getresponse().status == 400  # uvicorn: "Invalid HTTP request" over TLS
    except (http.client.HTTPException, OSError):
        pass
    finally:
        plain.close()


def test_the_certificate_is_kept_and_survives_a_restart(tmp_path):
    first = start_lan(tmp_path)
    try:
        fp = first.fingerprint
        info = json.loads((tmp_path / "endpoint.json").read_text())
        assert info["lan"] is True and info["fingerprint"] == fp and info["url"].startswith("https://")
        token, device = pair(first, "ward 2")
    finally:
        stop(first)
    tls = tmp_path / "data" / "lan" / "tls"
    assert (tls / "key.pem").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "data" / "lan" / "devices.json").stat().st_mode & 0o777 == 0o600
    assert token not in (tmp_path / "data" / "lan" / "devices.json").read_text()  # stored hashed
    second = start_lan(tmp_path)
    try:
        assert second.fingerprint == fp and second.port != 0
        # the paired device's token still works after the restart
        assert client.result(second.url, fp, token, "health")["lan"]["devices"] == 1
        assert [d["device_id"] for d in admin(second, "lan_devices")["devices"]] == [device]
    finally:
        stop(second)


def test_a_wildcard_bind_is_reached_on_loopback_from_the_workstation(tmp_path):
    server = start_lan(tmp_path, host="0.0.0.0")
    try:
        assert server.url == f"https://127.0.0.1:{server.port}"
        assert "0.0.0.0" not in server.bridge.lan.cert.names
        assert client.result(server.url, server.fingerprint, server.token, "health")["lan"]["devices"] == 0
    finally:
        stop(server)


def test_a_half_written_certificate_directory_is_an_error_not_replaced(tmp_path):
    cert = ensure_certificate(tmp_path / "tls", ("10.1.2.3",))
    assert "10.1.2.3" in cert.names and "127.0.0.1" in cert.names
    assert ensure_certificate(tmp_path / "tls", ("10.9.9.9",)).fingerprint == cert.fingerprint
    (tmp_path / "tls" / "key.pem").unlink()
    with pytest.raises(InputError, match="no key.pem"):
        ensure_certificate(tmp_path / "tls")
    (tmp_path / "tls" / "key.pem").write_text("not a key")
    with pytest.raises(InputError, match="can't be read"):
        ensure_certificate(tmp_path / "tls")
    assert normalize_fingerprint(cert.fingerprint.upper()) == cert.fingerprint
    with pytest.raises(InputError):
        normalize_fingerprint("abc")


def test_the_openai_package_over_a_pinned_httpx_client(lan):
    import httpx2
    import openai

    token, _ = pair(lan, "openai tablet")
    ctx = client.pinned_context(lan.url, lan.fingerprint)
    with httpx2.Client(verify=ctx, timeout=30) as http:
        oai = openai.OpenAI(base_url=lan.url + "/v1", api_key=token, http_client=http, max_retries=0)
        reply = oai.chat.completions.create(
            model="medgemma", messages=[{"role": "user", "content": "left lower lobe"}], max_tokens=8
        )
    assert reply.choices[0].message.content.strip() == "left lower lobe"
    with pytest.raises(client.PinMismatch):
        client.pinned_context(lan.url, "ab" * 32)


# -- pairing and device tokens ----------------------------------------------------------------------


def test_pairing_gives_a_token_that_works_and_revoking_it_gives_401(lan):
    code = admin(lan, "lan_pair_code")
    assert len(code["code"]) == 8 and code["code"].isdigit() and code["expires_in_s"] == 300.0
    reply = client.pair(lan.url, lan.fingerprint, code["code"], "ward 3 tablet")
    assert reply["fingerprint"] == lan.fingerprint and len(reply["token"]) == 64
    token, device = reply["token"], reply["device_id"]
    health = client.result(lan.url, lan.fingerprint, token, "health")
    assert "path" not in health["capabilities"]["image_sources"]  # a device never names server files
    status, replies = client.rpc(lan.url, lan.fingerprint, token, "generate", {"prompt": "a b c"})
    assert status == 200 and text_of(replies).split() == ["a", "b", "c"]
    listed = {d["device_id"]: d for d in admin(lan, "lan_devices")["devices"]}
    assert listed[device]["name"] == "ward 3 tablet" and listed[device]["last_seen"] is not None
    assert "token_sha256" not in listed[device]
    # the same code again: used up
    with pytest.raises(client.ServerError) as exc:
        client.pair(lan.url, lan.fingerprint, code["code"], "replay")
    assert (exc.value.status, exc.value.code) == (401, "unauthorized")
    assert admin(lan, "lan_revoke", device_id=device) == {"device_id": device, "revoked": True}
    status, headers, body = request(
        lan, "POST", "/v1/rpc", json.dumps({"v": 1, "id": "x", "op": "health"}).encode(), token
    )
    assert (
        status == 401 and body["error"]["code"] == "unauthorized" and headers["www-authenticate"] == "Bearer"
    )
    assert admin(lan, "lan_revoke", device_id=device)["revoked"] is False
    assert device not in {d["device_id"] for d in admin(lan, "lan_devices")["devices"]}


def test_a_device_may_not_run_admin_ops_nor_name_server_files(lan):
    token, _ = pair(lan)
    for op, params in [
        ("lan_pair_code", {}),
        ("lan_devices", {}),
        ("shutdown", {}),
        ("unload", {"model": "medgemma"}),
    ]:
        status, replies = client.rpc(lan.url, lan.fingerprint, token, op, params)
        assert status == 403 and replies[0]["error"]["code"] == "forbidden", op
        assert replies[-1]["finish_reason"] == "error"
    img = {"prompt": "x", "images": [{"path": "/etc/hostname"}]}
    status, replies = client.rpc(lan.url, lan.fingerprint, token, "generate", img)
    assert status == 400 and replies[0]["error"]["code"] == "invalid_request"
    assert not lan.bridge.shutting_down.is_set()


def test_wrong_codes_are_throttled_and_burn_the_open_codes(tmp_path):
    server = start_lan(tmp_path, pair_attempts=3)
    try:
        good = admin(server, "lan_pair_code")["code"]
        wrong = "00000000" if good != "00000000" else "11111111"
        for _ in range(3):
            with pytest.raises(client.ServerError) as exc:
                client.pair(server.url, server.fingerprint, wrong, "guess")
            assert exc.value.status == 401
        status, headers, body = request(
            server, "POST", "/v1/pair", json.dumps({"code": good, "device": "t"}).encode()
        )
        assert status == 429 and body["error"]["code"] == "busy" and int(headers["retry-after"]) >= 1
        assert server.bridge.lan.codes.open == 0  # the good code was burnt with the rest
    finally:
        stop(server)


def test_pairing_codes_expire_are_single_use_and_burn_with_a_clock():
    now = [0.0]
    codes = PairingCodes(ttl_s=60, attempts=2, clock=lambda: now[0])
    a, _ = codes.new()
    codes.take(a)
    with pytest.raises(PairingRefused):
        codes.take(a)  # replayed (one failure)
    b, _ = codes.new()
    now[0] = 61.0
    with pytest.raises(PairingRefused):
        codes.take(b)  # expired (the first failure is a minute old: one failure in the window)
    c, _ = codes.new()
    with pytest.raises(PairingRefused) as exc:
        codes.take("12345678" if c != "12345678" else "87654321")  # the second: burns c
    assert not isinstance(exc.value, PairingThrottled) and codes.open == 0
    with pytest.raises(PairingThrottled) as exc:
        codes.take(c)
    assert 0 < exc.value.retry_after <= 60
    now[0] = 200.0
    with pytest.raises(PairingRefused) as exc:
        codes.take(c)  # the window has passed, but c stays burnt
    assert not isinstance(exc.value, PairingThrottled)
    d, _ = codes.new()
    codes.take(d)


@pytest.mark.parametrize(
    "body, status",
    [
        (b"", 400),
        (b"{not json", 400),
        (b"\xff\xfe\x00", 400),
        (b"[1, 2]", 400),
        (b'"code"', 400),
        (b'{"device": "t"}', 400),
        (b'{"code": 12345678, "device": "t"}', 400),
        (b'{"code": "12345678"}', 400),
        (b'{"code": "12345678", "device": ""}', 400),
        (b'{"code": "12345678", "device": "a\\u0000b"}', 400),
        (json.dumps({"code": "1" * 40, "device": "t"}).encode(), 400),
        (json.dumps({"code": "12345678", "device": "t" * 65}).encode(), 400),
        (b'{"code": "abcdefgh", "device": "t"}', 401),
        (json.dumps({"code": "1", "device": "x" * 5000}).encode(), 413),
    ],
)
def test_malformed_pairing_bodies_get_4xx_never_500(tmp_path_factory, body, status):
    server = _malformed_server(tmp_path_factory)
    got, _, reply = request(server, "POST", "/v1/pair", body)
    assert got == status and isinstance(reply, dict) and reply["error"]["code"], (body, reply)


_MALFORMED: list = []


def _malformed_server(tmp_path_factory):
    if not _MALFORMED:  # one server for the parametrized cases; attempts high so none throttles
        _MALFORMED.append(start_lan(tmp_path_factory.mktemp("lan-malformed"), pair_attempts=100))
    return _MALFORMED[0]


@pytest.fixture(scope="module", autouse=True)
def _stop_malformed():
    yield
    for server in _MALFORMED:
        stop(server)


def test_malformed_admin_requests_and_tokens_get_4xx(lan):
    for params in ({}, {"device_id": 7}, {"device_id": "x" * 65}):
        status, replies = client.rpc(lan.url, lan.fingerprint, lan.token, "lan_revoke", params)
        assert status == 400 and replies[0]["error"]["code"] == "invalid_request", params
    for auth in ("Bearer", "Bearer " + "z" * 64, "Basic abc", "Bearer \u00e9t\u00e9"):
        conn = client.connection(lan.url, lan.fingerprint)
        conn.putrequest("POST", "/v1/rpc")
        conn.putheader("Authorization", auth.encode("latin-1"))
        conn.putheader("Content-Length", "2")
        conn.endheaders(b"{}")
        assert conn.getresponse().status == 401, auth
        conn.close()
    assert request(lan, "GET", "/v1/pair")[0] == 401  # only POST goes without a token
    assert request(lan, "GET", "/v1/pair", token=lan.token)[0] == 405
    status, _, body = request(lan, "POST", "/v1/rpc", b"{oops", lan.token)
    assert status == 400


# -- the queue -------------------------------------------------------------------------------------


def test_three_clients_queue_and_each_gets_its_answer_in_order(lan):
    model = lan.bridge.runtime.slots["medgemma"].model
    tokens = [pair(lan, f"tablet {i}")[0] for i in range(3)]
    prompts = ["first one", "second one here", "third"]
    model.gate.clear()
    try:
        a = Stream(lan, tokens[0], gen("1", prompts[0]))
        assert model.running.wait(10)
        b = Stream(lan, tokens[1], gen("1", prompts[1]))  # the same id: ids are per device
        assert b.next(queued)["position"] == 1
        c = Stream(lan, tokens[2], gen("1", prompts[2]))
        first = c.next(queued)
        assert first["position"] == 2 and isinstance(first["estimated_wait_s"], float)
        state = admin(lan, "health")["lan"]["queue"]
        assert (state["running"], state["waiting"]) == (1, 2)
    finally:
        model.gate.set()
    answers = [s.finish() for s in (a, b, c)]
    assert [text_of(r).strip() for r in answers] == prompts
    assert model.order[-3:] == prompts
    assert [r[-1]["finish_reason"] for r in answers] == ["stop"] * 3
    assert not any(queued(m) for m in answers[0])
    # c moves up as a finishes (an event for place 1 only when b is still running when it looks)
    assert [m["position"] for m in answers[2] if queued(m)] in ([2], [2, 1])
    assert all(s.status == 200 for s in (a, b, c))


def test_cancel_while_queued_ends_with_done_cancelled(lan):
    model = lan.bridge.runtime.slots["medgemma"].model
    (ta, _), (tb, _), (tc, _) = pair(lan, "a"), pair(lan, "b"), pair(lan, "c")
    model.gate.clear()
    try:
        a = Stream(lan, ta, gen("run", "running now"))
        assert model.running.wait(10)
        b = Stream(lan, tb, gen("wait", "never runs"))
        b.next(queued)
        # another device can't reach b's request: ids are per device
        assert client.result(lan.url, lan.fingerprint, tc, "cancel", {"target": "wait"})["found"] is False
        assert client.result(lan.url, lan.fingerprint, tb, "cancel", {"target": "wait"}) == {
            "target": "wait",
            "found": True,
        }
        out = b.finish(10)
        assert out[-1]["type"] == "done" and out[-1]["finish_reason"] == "cancelled"
        assert not any(m["type"] in ("result", "error") for m in out)
        assert lan.bridge.lan.queue.state()["waiting"] == 0
    finally:
        model.gate.set()
    assert text_of(a.finish()).strip() == "running now"
    assert "never runs" not in model.order


def test_the_time_limit_counts_from_the_turn_not_from_the_wait_in_line(tmp_path):
    from android_bridge.lan.mode import attach
    from android_bridge.settings import Limits

    model = EchoModel(stuck=True)
    bridge = Bridge(Runtime(medgemma=model), limits=Limits(request_timeout_s=0.4))
    attach(bridge, ServeSettings(data_dir=tmp_path, lan=LanSettings()))
    model.gate.clear()
    first: list = []
    bridge.submit(json.dumps(gen("a", "held past its limit")), first.append)
    assert model.running.wait(5)
    second = bridge.submit(json.dumps(gen("b", "waited in line")), (out := []).append)
    time.sleep(1.0)  # a is past its 0.4 s limit (it ends at its next token); b has waited 1 s
    model.gate.set()
    second.result(5)
    assert first[-2]["error"]["code"] == "cancelled" and "limit" in first[-2]["error"]["message"]
    assert queued(out[0]) and out[-1]["finish_reason"] == "stop", out[-2:]
    assert text_of(out).strip() == "waited in line"
    bridge.shutdown(grace_s=1)


def test_the_queue_is_fifo_bounded_and_estimates_from_measured_turns():
    now = [0.0]
    q = FairQueue(bound=1, clock=lambda: now[0])
    with q.turn(threading.Event()) as got:
        assert got
        now[0] = 4.0
    assert q.state() == {"running": 0, "waiting": 0, "bound": 1, "estimated_wait_s": 0.0}
    events: list = []
    entered = threading.Event()
    release = threading.Event()

    def hold():
        with q.turn(threading.Event()):
            entered.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    assert entered.wait(5)
    now[0] = 5.0  # the running turn has taken 1 s of the 4 s mean
    cancel = threading.Event()
    w = threading.Thread(target=lambda: q.turn(cancel, lambda p, e: events.append((p, e))).__enter__())
    w.start()
    deadline = time.monotonic() + 5
    while not events and time.monotonic() < deadline:
        time.sleep(0.01)
    assert events == [(1, 3.0)]
    from android_bridge.protocol import ProtocolError

    with pytest.raises(ProtocolError) as exc:  # one waiting already: the bound
        with q.turn(threading.Event()):
            pass
    assert exc.value.code == "busy" and exc.value.retry_after >= 1
    cancel.set()
    w.join(5)
    release.set()
    t.join(5)
    assert q.state()["waiting"] == 0


def test_on_a_device_a_second_generation_is_still_busy():
    model = EchoModel()
    bridge = Bridge(Runtime(medgemma=model))
    model.gate.clear()
    first: list = []
    try:
        bridge.submit(json.dumps(gen("a", "hold on")), first.append)
        assert model.running.wait(5)
        out = call(bridge, gen("b", "second"))
        assert out[0]["error"]["code"] == "busy" and not any(queued(m) for m in out)
        health = call(bridge, {"v": 1, "id": "h", "op": "health"})[-2]["result"]
        assert health["capabilities"]["concurrency"] == "busy" and "lan" not in health
        assert "lan_pair_code" not in health["capabilities"]["ops"]
        out = call(bridge, {"v": 1, "id": "p", "op": "lan_pair_code"})
        assert out[0]["error"]["code"] == "invalid_request"
    finally:
        model.gate.set()


# -- rate limits and the audit log -------------------------------------------------------------------


def test_a_device_over_its_rate_gets_429_and_the_admin_does_not(tmp_path):
    server = start_lan(tmp_path, rate=3)
    try:
        token, device = pair(server)
        health = json.dumps({"v": 1, "id": "h", "op": "health"}).encode()
        assert [request(server, "POST", "/v1/rpc", health, token)[0] for _ in range(3)] == [200] * 3
        status, headers, body = request(server, "POST", "/v1/rpc", health, token)
        assert status == 429 and body["error"]["code"] == "busy" and int(headers["retry-after"]) >= 1
        assert all(request(server, "POST", "/v1/rpc", health, server.token)[0] == 200 for _ in range(5))
        other, _ = pair(server, "another")  # buckets are per device
        assert request(server, "POST", "/v1/rpc", health, other)[0] == 200
    finally:
        stop(server)


def test_the_rate_limiter_refills():
    now = [0.0]
    limiter = RateLimiter(2, clock=lambda: now[0])
    assert limiter.take("d") == 0.0 and limiter.take("d") == 0.0
    assert limiter.take("d") == pytest.approx(30.0)
    now[0] = 30.0
    assert limiter.take("d") == 0.0


def test_the_audit_log_names_who_and_what_never_the_content(tmp_path):
    server = start_lan(tmp_path, rate=5)
    try:
        token, device = pair(server)
        status, replies = client.rpc(server.url, server.fingerprint, token, "generate", {"prompt": SECRET})
        assert status == 200 and text_of(replies).strip() == SECRET
        request(server, "POST", "/v1/rpc", b"{}", "f" * 64)  # a wrong token
        for _ in range(5):
            request(
                server, "POST", "/v1/rpc", json.dumps({"v": 1, "id": "h", "op": "health"}).encode(), token
            )
    finally:
        stop(server)
    path = tmp_path / "data" / "lan" / "audit.jsonl"
    assert path.stat().st_mode & 0o777 == 0o600
    raw = path.read_text()
    lines = [json.loads(line) for line in raw.splitlines()]
    assert all(tuple(e) == FIELDS for e in lines)
    gen_line = next(e for e in lines if e["op"] == "generate")
    assert (gen_line["device"], gen_line["route"], gen_line["status"], gen_line["finish"]) == (
        device,
        "POST /v1/rpc",
        200,
        "stop",
    )
    assert gen_line["bytes_in"] > len(SECRET) and gen_line["bytes_out"] > 0
    pair_line = next(e for e in lines if e["route"] == "POST /v1/pair")
    assert pair_line["status"] == 200 and pair_line["device"] == device
    assert any(e["device"] == "admin" and e["op"] == "lan_pair_code" for e in lines)
    assert any(e["device"] == "-" and e["status"] == 401 for e in lines)
    assert any(e["device"] == device and e["status"] == 429 for e in lines)
    for secret in (SECRET, "Jane", token, server.token):
        assert secret not in raw


def test_the_audit_log_rotates_and_keeps_whole_lines(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=4096)
    threads = [
        threading.Thread(
            target=lambda i=i: [
                log.write(device=f"dev-{i}", route="POST /v1/rpc", status=200) for _ in range(50)
            ]
        )
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.write(device="d", prompt=SECRET)  # an unknown field is dropped, never written
    files = [tmp_path / "audit.jsonl", tmp_path / "audit.jsonl.1"]
    assert all(f.exists() and f.stat().st_size <= 4096 for f in files)
    for f in files:
        for line in f.read_text().splitlines():
            assert tuple(json.loads(line)) == FIELDS
    assert SECRET not in files[0].read_text()


# -- the command line ------------------------------------------------------------------------------


def test_the_lan_cli_verbs_against_a_running_server(lan, tmp_path, capsys):
    from medgemma_edge.cli import main

    ep = str(lan.endpoint_file)
    assert main(["lan", "--endpoint-file", ep, "--json", "pair-code"]) == 0
    code = json.loads(capsys.readouterr().out)
    assert code["ok"] is True and len(code["code"]) == 8
    device = client.pair(lan.url, lan.fingerprint, code["code"], "cli tablet")
    assert main(["lan", "--endpoint-file", ep, "devices"]) == 0
    out = capsys.readouterr().out
    assert device["device_id"] in out and "cli tablet" in out
    assert main(["lan", "--endpoint-file", ep, "revoke", device["device_id"]]) == 0
    assert capsys.readouterr().out.strip() == f"{device['device_id']}: revoked"
    assert main(["lan", "--endpoint-file", ep, "revoke", device["device_id"]]) == 1
    assert main(["lan", "--endpoint-file", ep, "pair-code"]) == 0
    assert "fingerprint " + lan.fingerprint in capsys.readouterr().out
    # no server, or not a clinic server: one line, exit code 3
    assert main(["lan", "--endpoint-file", str(tmp_path / "none.json"), "devices"]) == 3
    (tmp_path / "loopback.json").write_text(json.dumps({"url": "http://127.0.0.1:1", "token": "t"}))
    assert main(["lan", "--endpoint-file", str(tmp_path / "loopback.json"), "devices"]) == 3
    err = capsys.readouterr().err
    assert "serve --lan" in err and "Traceback" not in err


def test_serve_lan_flags(tmp_path):
    from edge.errors import UsageError
    from medgemma_edge import serve
    from medgemma_edge.cli import build_parser

    def parse(*argv):
        return build_parser("serve").parse_args(["serve", "-b", str(tmp_path), *argv])

    got = serve._lan(parse("--lan", "10.0.0.5", "--lan-rate", "7", "--lan-queue", "3"))
    assert got["host"] == "10.0.0.5" and (got["lan"].rate, got["lan"].queue) == (7, 3)
    assert serve._lan(parse("--lan"))["host"] == "0.0.0.0"
    assert serve._lan(parse()) == {}
    for argv, message in [
        (("--lan-rate", "7"), "add --lan"),
        (("--lan", "--stdio"), "drop --stdio"),
        (("--lan", "--host", "10.0.0.5"), "give the address once"),
        (("--lan", "--no-data"), "drop --no-data"),
    ]:
        with pytest.raises(UsageError, match=message):
            serve._lan(parse(*argv))
    with pytest.raises(UsageError, match="at least 1"):
        serve._lan(parse("--lan", "--lan-rate", "0"))
    with pytest.raises(ValueError, match="data_dir"):
        ServeSettings(lan=LanSettings())


def test_serve_lan_end_to_end_with_the_cli(small_model_bundle, tmp_path):
    """``medgemma-edge serve --lan`` as a process, managed by ``medgemma-edge lan`` processes."""
    from conftest import run_cli

    ep = tmp_path / "endpoint.json"
    argv = [
        sys.executable,
        "-m",
        "medgemma_edge",
        "serve",
        "-b",
        str(small_model_bundle),
        "--data",
        str(tmp_path / "d"),
    ]
    argv += ["--lan", "127.0.0.1", "--endpoint-file", str(ep), "--lan-rate", "30"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[0].startswith("medgemma-edge serve: https://127.0.0.1:"), (lines, proc.stderr.read())
        fp = lines[2].split()[-1]
        info = json.loads(ep.read_text())
        assert info["fingerprint"] == fp and info["lan"] is True
        made = run_cli("lan", "--endpoint-file", str(ep), "--json", "pair-code")
        assert made.returncode == 0, made.stderr
        code = json.loads(made.stdout)["code"]
        device = client.pair(info["url"], fp, code, "e2e tablet")
        health = client.result(info["url"], fp, device["token"], "health")
        assert health["capabilities"]["concurrency"] == "queue" and health["lan"]["devices"] == 1
        listed = run_cli("lan", "--endpoint-file", str(ep), "devices")
        assert listed.returncode == 0 and device["device_id"] in listed.stdout
        revoked = run_cli("lan", "--endpoint-file", str(ep), "revoke", device["device_id"])
        assert revoked.returncode == 0 and "revoked" in revoked.stdout
        with pytest.raises(client.ServerError) as exc:
            client.result(info["url"], fp, device["token"], "health")
        assert exc.value.status == 401
    finally:
        proc.terminate()
        proc.wait(30)
    assert not ep.exists()  # removed on exit
    audit = (tmp_path / "d" / "lan" / "audit.jsonl").read_text()
    assert device["device_id"] in audit and device["token"] not in audit


# -- a second address, in a network namespace --------------------------------------------------------

NETNS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from test_lan import EchoModel, start_lan, stop, pair
    from android_bridge.lan import client
    server = start_lan(Path(sys.argv[1]), host="10.77.0.1")
    try:
        token, _ = pair(server)
        status, replies = client.rpc(server.url, server.fingerprint, token, "generate", {"prompt": "over the lan"})
        try:
            client.rpc(server.url, "0" * 64, token, "health")
            refused = False
        except client.PinMismatch:
            refused = True
        print(json.dumps({"url": server.url, "status": status, "text": replies[-2]["result"]["text"],
                          "refused": refused, "names": list(server.bridge.lan.cert.names)}))
    finally:
        stop(server)
    """
)


def _netns_available() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, timeout=10
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _netns_available(), reason="unshare -n (a network namespace) is not allowed here")
def test_a_second_address_in_a_network_namespace(tmp_path):
    script = tmp_path / "netns.py"
    script.write_text(NETNS_SCRIPT)
    shell = (
        "ip link set lo up && ip addr add 10.77.0.1/24 dev lo && "
        f"exec {sys.executable} {script} {tmp_path} {Path(__file__).parent}"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        ["unshare", "-n", "sh", "-c", shell], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["url"].startswith("https://10.77.0.1:") and got["status"] == 200
    assert got["text"].strip() == "over the lan" and got["refused"] is True
    assert "10.77.0.1" in got["names"]


def test_the_demo_step_pairs_pins_and_revokes(tmp_path, twin_llm_bundle):
    from medgemma_edge.demo.lan import demo_lan

    n = demo_lan(tmp_path, twin_llm_bundle)
    assert n["url"].startswith("https://127.0.0.1:") and len(n["fingerprint"]) == 64
    assert n["health_ok"] and n["revoked"]
    assert n["wrong_pin"] == "refused (PinMismatch)"
    assert n["replay"] == n["after_revoke"] == "refused (HTTP 401 unauthorized)"
