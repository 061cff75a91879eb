"""The clinic server's HTTP pieces: ``POST /v1/pair`` and the audit middleware.

``POST /v1/pair`` needs no token (a device has none yet): body ``{"code": "12345678",
"device": "name"}`` (at most :data:`MAX_PAIR_BODY` bytes) → ``{"token", "device_id",
"fingerprint"}``; a wrong, expired, replayed or burnt code gets 401 ``unauthorized``, and
past the failed attempts allowed a minute 429 ``busy`` with Retry-After. The token
check for every other route (launch token or a device's) is the app's guard
(android_bridge.http.app.Guard).

:class:`Audit` wraps the whole app in LAN mode: for each HTTP request it counts the bytes in
and out, takes the status, lets the guard name the caller and the bridge name the op and its
finish reason (through :data:`android_bridge.bridge.AUDIT`), and writes one line to the audit
log when the reply is sent. Request content never reaches it.
"""

from __future__ import annotations

import json
import logging
import time

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from android_bridge.bridge import AUDIT
from android_bridge.http.glue import error_response
from android_bridge.lan.pairing import PairingRefused, PairingThrottled
from edge.errors import InputError

log = logging.getLogger(__name__)

MAX_PAIR_BODY = 4096
PAIR_PATH = "/v1/pair"
NO_STORE = {"cache-control": "no-store"}


def is_public(method: str, path: str) -> bool:
    """The LAN routes that go without a token: pairing."""
    return method == "POST" and path == PAIR_PATH


async def pair(request: Request) -> Response:
    lan = request.app.state.bridge.lan
    if lan is None:  # the route exists in LAN mode only; belt and braces
        return error_response("not_found", "pairing is for serve --lan")
    data, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_PAIR_BODY:
            return error_response("too_large", f"a pairing body is at most {MAX_PAIR_BODY} bytes")
        data.append(chunk)
    try:
        body = json.loads(b"".join(data))
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        return error_response("invalid_request", 'the body must be {"code": "...", "device": "name"}')
    try:
        reply = await run_in_threadpool(lan.pair, body.get("code"), body.get("device"))
    except InputError as exc:
        return error_response("invalid_request", str(exc), headers=NO_STORE)
    except PairingThrottled as exc:
        log.info("lan: a pairing attempt was throttled")
        return error_response("busy", str(exc), retry_after=exc.retry_after, headers=NO_STORE)
    except PairingRefused as exc:
        log.info("lan: a pairing attempt was refused")
        return JSONResponse(
            {"error": {"code": "unauthorized", "message": str(exc), "type": "unauthorized"}},
            status_code=401,
            headers=NO_STORE,
        )
    note = AUDIT.get()
    if note is not None:
        note["device"] = reply["device_id"]
    return JSONResponse(reply, headers=NO_STORE)


class Audit:
    """ASGI middleware: one audit line per HTTP request (see the module's docstring)."""

    def __init__(self, app, *, audit):
        self.app = app
        self.audit = audit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        note: dict = {"device": "-", "status": None, "bytes_in": 0, "bytes_out": 0}
        token = AUDIT.set(note)
        t0 = time.perf_counter()

        async def counted_receive():
            msg = await receive()
            if msg["type"] == "http.request":
                note["bytes_in"] += len(msg.get("body", b""))
            return msg

        async def counted_send(msg):
            if msg["type"] == "http.response.start":
                note["status"] = msg["status"]
            elif msg["type"] == "http.response.body":
                note["bytes_out"] += len(msg.get("body", b""))
            await send(msg)

        try:
            await self.app(scope, counted_receive, counted_send)
        finally:
            AUDIT.reset(token)
            self.audit.write(
                device=note["device"],
                route=f"{scope['method']} {scope['path'][:64]}",
                op=note.get("op"),
                status=note["status"],
                finish=note.get("finish"),
                bytes_in=note["bytes_in"],
                bytes_out=note["bytes_out"],
                duration_s=round(time.perf_counter() - t0, 4),
            )
