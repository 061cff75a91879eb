"""The Java client and the Kotlin wrapper against a clinic server (``serve --lan``) on loopback:
TLS pinned to the certificate's fingerprint, pairing, device tokens, the queue.

The server is the real app under uvicorn with TLS (android_bridge.http.server) over the tiny
MedGemma twin, as in test_bridge_clients; the JVM sources are compiled by its fixture. To make
generations wait their turn, the test takes MedGemma's turn in the server's queue itself (as a
running generation would) and gives it up when the JVM says its generations are queued.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

import pytest
from fixtures_bridge import make_bridge, start_server
from test_bridge_clients import (  # the compiled classes and the runner, not its tests
    KOTLIN_STDLIB,
    ORG_JSON,
    _need,
    _run,
    jvm_classes,  # noqa: F401 (a fixture)
)

PROMPT_WORD = "pneumonia"  # in every prompt the JVM tests send; never in the audit log


@pytest.fixture(scope="module")
def lan_server(twin_model, twin_llm_bundle, tmp_path_factory):
    """``serve --lan`` on 127.0.0.1 (port 0) over the twin, its state in a tmp data dir."""
    from android_bridge.settings import LanSettings

    tmp = tmp_path_factory.mktemp("lan-clients")
    bridge = make_bridge(bundle=twin_llm_bundle, medgemma=twin_model)
    server = start_server(bridge, tmp, data_dir=tmp / "data", lan=LanSettings())
    yield server
    server.stop()
    server.join(10)


@pytest.fixture(scope="module")
def jvm(jvm_classes):  # noqa: F811
    """The compiled Java and Kotlin classes (test_bridge_clients compiles them)."""
    return jvm_classes


def _java(jvm, *args: str) -> str:
    return _run([jvm["java"], ORG_JSON], "LanTest", *args)


@contextmanager
def holding_medgemma(server, release: Callable[[], bool] = lambda: False):
    """Hold MedGemma's turn in the server's queue until ``release()`` is true or the block ends.

    Yields a dict whose ``peak`` is the most generations seen waiting behind the holder."""
    queue = server.lan.queue
    held, stop = threading.Event(), threading.Event()
    seen = {"peak": 0}

    def hold() -> None:
        with queue.turn(threading.Event()) as got:
            assert got
            held.set()
            while not stop.is_set() and not release():
                seen["peak"] = max(seen["peak"], queue.state()["waiting"])
                time.sleep(0.01)
            seen["peak"] = max(seen["peak"], queue.state()["waiting"])

    t = threading.Thread(target=hold, name="hold-medgemma", daemon=True)
    t.start()
    assert held.wait(10), "the test could not take MedGemma's turn"
    try:
        yield seen
    finally:
        stop.set()
        t.join(10)
        assert not t.is_alive()


class Forwarder:
    """TCP from ``127.0.0.2:PORT`` to ``upstream``: the server as a tablet on the LAN sees it, at
    an address its certificate does not name (as when serve --lan binds every interface)."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.sock = socket.create_server(("127.0.0.2", 0))
        self.url = f"https://127.0.0.2:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            up = socket.create_connection(self.upstream, timeout=30)
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def _audit(server, until: Callable[[list[dict]], bool] = lambda lines: True) -> list[dict]:
    """The audit log's lines, once ``until`` holds for them (a request's line is written just
    after its reply is sent, so the JVM may be done a moment before the last line is there)."""
    deadline = time.monotonic() + 10
    while True:
        text = (server.lan.directory / "audit.jsonl").read_text()
        lines = [json.loads(line) for line in text.splitlines()]
        if until(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_java_pairs_and_talks_over_pinned_tls(jvm, lan_server):
    ep = str(lan_server.endpoint_file)
    before = {d["device_id"] for d in lan_server.lan.devices.list()}
    out = _java(jvm, ep, "basic")
    for check in (
        "ok pair dev-",
        "ok a replayed code -> unauthorized",
        "ok a blank device name -> invalid_request",
        "ok malformed pins and an http URL refused at construction",
        "ok health over pinned TLS",
        "ok generate over pinned TLS",
        "ok wrong pin refused",
        "ok pairing with a wrong pin sends nothing",
        "ok a wrong device token -> 401 unauthorized",
        "ok an admin op from a device -> forbidden",
        "ok revoked dev-",
        "ok java lan basic",
    ):
        assert check in out, out
    # the server's side: the revoked tablet is gone, the one paired after the wrong pin is kept
    devices = {
        d["device_id"]: d["name"] for d in lan_server.lan.devices.list() if d["device_id"] not in before
    }
    assert sorted(devices.values()) == ["java-tablet-2"], devices
    revoked = out.split("ok revoked ")[1].split(":")[0]
    assert revoked not in devices
    stored = json.loads((lan_server.lan.directory / "devices.json").read_text())
    assert revoked not in {d["device_id"] for d in stored["devices"]}
    # each device's requests are audited under its id, with no patient content
    audit = _audit(lan_server)
    assert {"op": "generate", "status": 200} in [
        {"op": a["op"], "status": a["status"]} for a in audit if a["device"] == revoked
    ]
    assert any(a["status"] == 401 and a["route"] == "POST /v1/pair" for a in audit)  # the replayed code
    assert PROMPT_WORD not in (lan_server.lan.directory / "audit.jsonl").read_text()


def test_java_queued_generations_get_their_answers_in_order(jvm, lan_server, tmp_path):
    signal = tmp_path / "both-queued"
    with holding_medgemma(lan_server, release=signal.exists) as seen:
        out = _java(jvm, str(lan_server.endpoint_file), "queue", str(signal))
    assert "ok queued: first positions 1 " in out and "; second positions 2 " in out, out
    assert seen["peak"] == 2
    assert lan_server.lan.queue.state() | {"estimated_wait_s": 0} == {
        "running": 0,
        "waiting": 0,
        "bound": 16,
        "estimated_wait_s": 0,
    }


def test_java_cancels_while_queued(jvm, lan_server):
    # MedGemma stays taken until the JVM is done: the generation can only end by its cancel
    n = len(_audit(lan_server))
    with holding_medgemma(lan_server) as seen:
        out = _java(jvm, str(lan_server.endpoint_file), "cancel")
        assert lan_server.lan.queue.state()["waiting"] == 0  # it left the line while still held
    assert "ok cancelled while queued: positions 1 " in out and "finish cancelled" in out, out
    assert seen["peak"] == 1
    audit = _audit(lan_server, lambda lines: any(a["op"] == "generate" for a in lines[n:]))
    # another device's cancel (found nothing), the owner's, and the generation they ended
    ends = sorted((a["op"], a["finish"]) for a in audit[n:] if a["op"] in ("generate", "cancel"))
    assert ends == [("cancel", "stop"), ("cancel", "stop"), ("generate", "cancelled")]


def test_java_pin_refuses_a_certificate_the_jvm_trusts(jvm, lan_server, tmp_path):
    """With the server's certificate in this JVM's trust store, the JVM's own checks accept it
    (so it is valid for a CA-trusting client) and the pin alone refuses it; at an address the
    certificate does not name, the JVM's host name check refuses it and the pin lets it in."""
    names = {str(n) for n in lan_server.lan.cert.names}
    assert "127.0.0.1" in names and "127.0.0.2" not in names
    store = tmp_path / "trust.p12"
    subprocess.run(
        [
            _need("keytool"),
            "-importcert",
            "-noprompt",
            "-alias",
            "clinic-server",
            "-file",
            str(lan_server.lan.cert.cert),
            "-keystore",
            str(store),
            "-storetype",
            "PKCS12",
            "-storepass",
            "changeit",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    elsewhere = Forwarder((lan_server.host, lan_server.port))
    try:
        out = _java(jvm, str(lan_server.endpoint_file), "trusted", str(store), elsewhere.url)
    finally:
        elsewhere.close()
    assert "ok the JVM's own checks accept the certificate (HTTP 200)" in out, out
    assert (
        "ok a trusted certificate refused against another pin" in out and "ok pinned to it: HTTP 200" in out
    )
    assert "ok at 127.0.0.2 the JVM's host name check refuses it" in out
    assert "ok at 127.0.0.2 the pin stands in for the host name: health" in out


def test_kotlin_pairs_and_waits_its_turn(jvm, lan_server, tmp_path):
    signal = tmp_path / "queued"
    with holding_medgemma(lan_server, release=signal.exists) as seen:
        out = _run(
            [jvm["kotlin"], jvm["java"], ORG_JSON, KOTLIN_STDLIB],
            "LanTestKtKt",
            str(lan_server.endpoint_file),
            str(signal),
        )
    assert "ok kotlin wrong pin refused" in out and "queued at [1]" in out, out
    assert seen["peak"] == 1
    assert "kotlin-tablet" in {d["name"] for d in lan_server.lan.devices.list()}
