"""Fixtures for the bridge: bridges over the session's models, a client per transport, servers.

Models are the session's (``twin_model``: tiny MedGemma twin with a projector; ``small_model``:
the real Gemma 3 270M; MedSigLIP loaded once from ``medsiglip_bundle``); nothing here loads a
model per test. Every transport is exercised through the same small client interface:
``replies(body) -> (http_status | None, [reply, ...])`` and ``stream(body)`` (an iterator).
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import socket
import threading
from pathlib import Path

import pydicom
import pytest

from android_bridge.bridge import Bridge
from android_bridge.protocol import request_id
from android_bridge.runtime import Runtime
from android_bridge.transcripts import FIXTURES

TRANSPORTS = ("inproc", "stdio", "unix", "http")
PYDICOM_SAMPLES = Path(pydicom.__file__).parent / "data" / "test_files"  # offline, in the package
IMAGE_PNG = (FIXTURES / "image.png").read_bytes()


def body_of(req) -> bytes:
    return (
        req.encode() if isinstance(req, str) else req if isinstance(req, bytes) else json.dumps(req).encode()
    )


class InProcClient:
    """The in-process transport: ``Bridge.handle`` on a thread, replies through a queue."""

    def __init__(self, bridge: Bridge):
        self.bridge = bridge

    def stream(self, req):
        q: queue.Queue = queue.Queue()
        threading.Thread(
            target=lambda: (self.bridge.handle(body_of(req), q.put), q.put(None)), daemon=True
        ).start()
        while (msg := q.get(timeout=120)) is not None:
            yield msg

    def replies(self, req):
        return None, list(self.stream(req))


class LineClient:
    """JSON lines over a pair of byte streams (stdio pipes or a Unix socket), demultiplexed by id."""

    def __init__(self, reader, writer):
        self.writer = writer
        self.queues: dict = {}
        self.last = None
        self.lock = threading.Lock()
        threading.Thread(target=self._read, args=(reader,), daemon=True).start()

    def _read(self, reader) -> None:
        for line in reader:
            msg = json.loads(line)
            with self.lock:
                q = self.queues.get(msg["id"]) or self.queues.get(self.last)
            q.put(msg)

    def stream(self, req):
        data = body_of(req)
        key = request_id(data) or f"raw-{id(data)}"
        q: queue.Queue = queue.Queue()
        with self.lock:
            self.queues[key], self.last = q, key
        self.writer.write(data + b"\n")
        self.writer.flush()
        try:
            while True:
                msg = q.get(timeout=120)
                yield msg
                if msg["type"] == "done":
                    return
        finally:
            with self.lock:
                self.queues.pop(key, None)

    def replies(self, req):
        return None, list(self.stream(req))


class HTTPClient:
    """POST /v1/rpc with the token; one connection per request, replies read line by line."""

    def __init__(self, url: str, token: str):
        self.host, self.port = url.removeprefix("http://").split(":")
        self.token = token
        self.status = None

    def stream(self, req):
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=120)
        try:
            conn.request("POST", "/v1/rpc", body=body_of(req), headers=self.headers())
            resp = conn.getresponse()
            self.status = resp.status
            for line in resp:
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}

    def replies(self, req):
        out = list(self.stream(req))
        return self.status, out


def make_bridge(**runtime_kwargs) -> Bridge:
    return Bridge(Runtime(**runtime_kwargs))


def start_server(bridge: Bridge, tmp: Path, **settings):
    from android_bridge.http.server import RunningServer
    from android_bridge.settings import ServeSettings

    server = RunningServer(ServeSettings(**settings), bridge).start()
    server.write_endpoint(tmp / "endpoint.json")
    return server


class Transports:
    """One client per transport over one bridge, started once and shared."""

    def __init__(self, bridge: Bridge, tmp: Path):
        from android_bridge.transports import UnixSocketServer, serve_lines

        self.bridge = bridge
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        self._stdio = threading.Thread(
            target=serve_lines, args=(bridge, os.fdopen(in_r, "rb"), os.fdopen(out_w, "wb")), daemon=True
        )
        self._stdio.start()
        self.unix = UnixSocketServer(tmp / "bridge.sock", bridge)
        threading.Thread(target=self.unix.serve_forever, daemon=True).start()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(tmp / "bridge.sock"))
        self.server = start_server(bridge, tmp)
        self.clients = {
            "inproc": InProcClient(bridge),
            "stdio": LineClient(os.fdopen(out_r, "rb"), os.fdopen(in_w, "wb")),
            "unix": LineClient(sock.makefile("rb"), sock.makefile("wb")),
            "http": HTTPClient(self.server.url, self.server.token),
        }

    def close(self) -> None:
        self.server.stop()
        self.server.join(10)
        self.unix.shutdown()
        self.unix.server_close()


@pytest.fixture(scope="session")
def twin_bridge(twin_model, twin_llm_bundle, medsiglip_bundle, tmp_path_factory):
    """The tiny twin (images) and MedSigLIP (loaded by the runtime, so unload/load work), with a
    study store holding pydicom's CT_small.dcm (the only CT: the clinic transcript lists it) and
    an empty report store."""
    from edge.reports.store import ReportStore
    from edge.studies.store import StudyStore

    data = tmp_path_factory.mktemp("clinic-data")
    studies = StudyStore(data / "studies")
    studies.add_file(PYDICOM_SAMPLES / "CT_small.dcm")
    reports = ReportStore(data / "reports")
    bridge = make_bridge(
        bundle=twin_llm_bundle,
        medsiglip_bundle=medsiglip_bundle,
        medgemma=twin_model,
        studies=studies,
        reports=reports,
    )
    bridge.runtime.load("medsiglip")
    yield bridge
    bridge.runtime.close()
    studies.close()
    reports.close()


@pytest.fixture(scope="session")
def small_bridge(small_model, small_model_bundle):
    """The real Gemma 3 270M (text only)."""
    return make_bridge(bundle=small_model_bundle, medgemma=small_model)


@pytest.fixture(scope="session")
def twin_transports(twin_bridge, tmp_path_factory):
    t = Transports(twin_bridge, tmp_path_factory.mktemp("bridge-twin"))
    yield t
    t.close()


@pytest.fixture(scope="session")
def small_transports(small_bridge, tmp_path_factory):
    t = Transports(small_bridge, tmp_path_factory.mktemp("bridge-270m"))
    yield t
    t.close()
