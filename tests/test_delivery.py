"""Store-and-forward delivery (edge.reports.outbox, android_bridge.delivery): a PACS that is down
keeps the report queued across a restart with growing back-off, then receives it exactly once
with the same SOP Instance UID; a FHIR endpoint that fails, then takes the bundle; refusals end
an item as failed; the Deliverer thread; ``report send`` / ``report outbox``."""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import threading
import time

import pytest
from pynetdicom import AE, evt
from test_reports import cli, signed_report

from android_bridge.delivery import (
    COMPREHENSIVE_SR,
    EXPLICIT_VR_LE,
    DeliverySettings,
    make_senders,
    parse_pacs,
)
from edge.errors import ConflictError, UsageError
from edge.reports.outbox import BACKOFF_MAX_S, Deliverer, DeliveryFailed, Outbox, backoff_s
from edge.reports.store import ReportStore


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pacs:
    """A pynetdicom Storage SCP on a fixed port, started and stopped by the test."""

    def __init__(self, port: int, status: int = 0x0000) -> None:
        self.port, self.status, self.received, self.server = port, status, [], None

    def _store(self, event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        return self.status

    def up(self) -> Pacs:
        ae = AE(ae_title="PACS")
        ae.add_supported_context(COMPREHENSIVE_SR, EXPLICIT_VR_LE)
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        return self

    def down(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


@pytest.fixture
def pacs():
    p = Pacs(free_port())
    yield p
    p.down()


def test_backoff_doubles_and_is_capped():
    assert [backoff_s(n) for n in (1, 2, 3, 4)] == [5, 10, 20, 40]
    assert backoff_s(30) == BACKOFF_MAX_S == 600


def test_pacs_down_then_up_delivers_exactly_once(tmp_path, pacs):
    root = tmp_path / "reports"
    dest = {"kind": "dicom", "host": "127.0.0.1", "port": pacs.port, "ae_title": "PACS"}
    store = ReportStore(root)
    r = signed_report(store)
    item = Outbox(store).queue(r["report_id"], r["version"], dest)
    assert (
        item["state"] == "queued"
        and item["attempts"] == 0
        and item["sop_instance_uid"] == r["sr_sop_instance_uid"]
    )
    assert (
        Outbox(store).queue(r["report_id"], 1, dict(dest))["item_id"] == item["item_id"]
    )  # not queued twice

    t0 = time.time()
    (tried,) = Outbox(store).deliver_due(make_senders(store), now=t0)
    assert (tried["state"], tried["attempts"]) == ("queued", 1) and "unreachable" in tried["last_error"]
    first_next = tried["next_attempt"]
    store.close()  # the runtime restarts: the queue is in the database

    store = ReportStore(root)
    outbox = Outbox(store)
    assert outbox.list()[0] == tried
    assert outbox.deliver_due(make_senders(store), now=t0 + 4) == []  # backing off: not due yet
    (tried,) = outbox.deliver_due(make_senders(store), now=t0 + 5)
    assert tried["attempts"] == 2 and tried["next_attempt"] > first_next  # 5 s, then 10 s
    store.close()

    pacs.up()
    store = ReportStore(root)
    outbox = Outbox(store)
    (done,) = outbox.deliver_due(make_senders(store), now=t0 + 15)
    assert done["state"] == "delivered" and done["attempts"] == 3 and done["last_error"] is None
    assert done["delivered_at"] and done["next_attempt"] is None
    assert outbox.deliver_due(make_senders(store), now=t0 + 10_000) == []  # nothing more to send
    assert outbox.queue(r["report_id"], 1, dest)["state"] == "delivered"  # a delivered one is never requeued
    assert len(pacs.received) == 1 and pacs.received[0].SOPInstanceUID == r["sr_sop_instance_uid"]
    assert pacs.received[0].VerificationFlag == "VERIFIED"
    assert store.get(r["report_id"])["delivery"] == [done]
    assert [a["action"] for a in store.audit(r["report_id"])][-2:] == ["queue", "deliver"]
    with (
        pytest.raises(ConflictError, match="final"),
        store.transaction() as c,
    ):  # a trigger guards delivered items
        c.execute("UPDATE outbox SET state = 'queued'")
    store.close()


@pytest.mark.parametrize(
    "status, state, words", [(0xA700, "queued", "out of resources"), (0xC000, "failed", "refused")]
)
def test_pacs_error_statuses(tmp_path, pacs, status, state, words):
    pacs.status = status
    pacs.up()
    with ReportStore(tmp_path / "r") as store:
        r = signed_report(store)
        outbox = Outbox(store)
        outbox.queue(
            r["report_id"], 1, {"kind": "dicom", "host": "127.0.0.1", "port": pacs.port, "ae_title": "PACS"}
        )
        (item,) = outbox.deliver_due(make_senders(store))
        assert (
            item["state"] == state and f"0x{status:04X}" in item["last_error"] and words in item["last_error"]
        )


class Fhir(http.server.BaseHTTPRequestHandler):
    answers: list[int] = []
    bodies: list[tuple[str, bytes]] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).bodies.append((self.headers["Content-Type"], body))
        code = type(self).answers.pop(0)
        self.send_response(code)
        reply = b'{"resourceType": "OperationOutcome"}'
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def fhir_server(*answers: int):
    Fhir.answers, Fhir.bodies = list(answers), []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Fhir)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/fhir"
    finally:
        server.shutdown()
        server.server_close()


def test_fhir_500_then_201(tmp_path):
    from fhir.resources.R4B.bundle import Bundle

    with fhir_server(500, 201) as url, ReportStore(tmp_path / "r") as store:
        r = signed_report(store)
        outbox = Outbox(store)
        outbox.queue(r["report_id"], 1, {"kind": "fhir", "url": url})
        t0 = time.time()
        (item,) = outbox.deliver_due(make_senders(store), now=t0)
        assert item["state"] == "queued" and "HTTP 500" in item["last_error"]
        (item,) = outbox.deliver_due(make_senders(store), now=t0 + 5)
        assert item["state"] == "delivered" and item["attempts"] == 2
        assert len(Fhir.bodies) == 2 and Fhir.bodies[0] == Fhir.bodies[1]  # the resend is the same bundle
        kind, body = Fhir.bodies[1]
        assert kind.startswith("application/fhir+json")
        assert Bundle.model_validate_json(body).entry[0].resource.conclusion == "Right lower lobe pneumonia."


def test_fhir_refusal_fails_and_can_be_queued_again(tmp_path):
    with fhir_server(400, 201) as url, ReportStore(tmp_path / "r") as store:
        r = signed_report(store)
        outbox = Outbox(store)
        first = outbox.queue(r["report_id"], 1, {"kind": "fhir", "url": url})
        (item,) = outbox.deliver_due(make_senders(store))
        assert item["state"] == "failed" and "HTTP 400" in item["last_error"]
        again = outbox.queue(r["report_id"], 1, {"kind": "fhir", "url": url})
        assert again["item_id"] != first["item_id"] and again["state"] == "queued"
        assert [i["state"] for i in outbox.deliver_due(make_senders(store))] == ["delivered"]
        assert "fail" in [a["action"] for a in store.audit(r["report_id"])]


def test_unreachable_fhir_and_a_sender_bug_are_retried(tmp_path):
    with ReportStore(tmp_path / "r") as store:
        r = signed_report(store)
        outbox = Outbox(store)
        outbox.queue(r["report_id"], 1, {"kind": "fhir", "url": f"http://127.0.0.1:{free_port()}/fhir"})
        (item,) = outbox.deliver_due(make_senders(store))
        assert item["state"] == "queued" and "unreachable" in item["last_error"]

        def broken(item):
            raise KeyError("bug")

        (item,) = outbox.deliver_due({"fhir": broken}, now=time.time() + 60)
        assert (
            item["state"] == "queued" and item["last_error"].startswith("KeyError") and item["attempts"] == 2
        )


def test_deliverer_thread_wakes_on_queue(tmp_path, pacs):
    pacs.up()
    with ReportStore(tmp_path / "r") as store:
        outbox = Outbox(store)
        deliverer = Deliverer(outbox, make_senders(store), interval_s=60)
        deliverer.start()
        try:
            r = signed_report(store)
            t0 = time.monotonic()
            dest = {"kind": "dicom", "host": "127.0.0.1", "port": pacs.port, "ae_title": "PACS"}
            Outbox(store).queue(r["report_id"], 1, dest)  # any Outbox of the store wakes it, as the ops' do
            deadline = time.time() + 20
            while outbox.list()[0]["state"] != "delivered" and time.time() < deadline:
                time.sleep(0.05)
        finally:
            deliverer.stop()
        assert outbox.list()[0]["state"] == "delivered" and len(pacs.received) == 1
        assert time.monotonic() - t0 < 20  # woken by the queue, not after the 60 s interval


def test_queue_refuses_drafts_and_bad_destinations(tmp_path):
    with ReportStore(tmp_path / "r") as store:
        r = signed_report(store)
        outbox = Outbox(store)
        store.amend(r["report_id"], final=r["final"], reason="typo")
        with pytest.raises(ConflictError, match="is a draft"):
            outbox.queue(r["report_id"], 2, {"kind": "fhir", "url": "http://x/fhir"})
        for bad, words in [
            ({"kind": "fhir", "url": "file:///etc/passwd"}, "http:// or https://"),
            ({"kind": "dicom", "host": "pacs", "port": 0}, "port number"),
            ({"kind": "dicom", "host": "pacs", "port": 104, "ae_title": "A" * 17}, "1 to 16"),
            ({"kind": "smtp"}, "destination must be"),
            ({"kind": "fhir", "url": "http://x", "token": "t"}, "unknown fields"),
        ]:
            with pytest.raises(UsageError, match=words):
                outbox.queue(r["report_id"], 1, bad)
        assert outbox.list() == []
        with pytest.raises(DeliveryFailed):
            raise DeliveryFailed("x")


def test_delivery_settings():
    assert parse_pacs("10.0.0.5:104/PACS") == {
        "kind": "dicom",
        "host": "10.0.0.5",
        "port": 104,
        "ae_title": "PACS",
    }
    assert (
        parse_pacs("[fe80::1]:11112")["host"] == "fe80::1" and parse_pacs("pacs:104")["ae_title"] == "ANY-SCP"
    )
    for bad in ("pacs", "pacs:http", ":104"):
        with pytest.raises(UsageError, match="HOST:PORT"):
            parse_pacs(bad)
    s = DeliverySettings(pacs="pacs:104/ARCHIVE", fhir_url="https://his.local/fhir")
    assert (
        s.destination()["ae_title"] == "ARCHIVE" and s.destination("fhir")["url"] == "https://his.local/fhir"
    )
    with pytest.raises(UsageError, match="--pacs"):
        DeliverySettings().destination()
    with pytest.raises(UsageError, match="http"):
        DeliverySettings(fhir_url="ftp://his/fhir")
    with pytest.raises(UsageError, match="fhir_bundle must be one of"):
        DeliverySettings(fhir_bundle="batch")


def test_cli_send_and_outbox(tmp_path, capsys, pacs):
    with ReportStore(tmp_path / "reports") as store:
        r = signed_report(store)
    data = str(tmp_path)
    code, out, _ = cli(
        capsys,
        "report",
        "send",
        r["report_id"],
        "--pacs",
        f"127.0.0.1:{pacs.port}/PACS",
        "--data",
        data,
        "--json",
    )
    item = json.loads(out)
    assert (
        code == 0
        and item["state"] == "queued"
        and item["attempts"] == 1
        and "unreachable" in item["last_error"]
    )
    pacs.up()
    code, out, _ = cli(
        capsys, "report", "send", r["report_id"], "--pacs", f"127.0.0.1:{pacs.port}/PACS", "--data", data
    )
    assert code == 0 and "delivered" in out and f"#{item['item_id']}" in out  # the same item, tried at once
    code, out, _ = cli(capsys, "report", "outbox", "--data", data, "--json")
    assert [i["state"] for i in json.loads(out)["items"]] == ["delivered"] and len(pacs.received) == 1
    code, _, err = cli(capsys, "report", "send", r["report_id"], "--fhir", "file:///x", "--data", data)
    assert code == 2 and "http:// or https://" in err
