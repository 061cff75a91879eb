"""The loopback HTTP app (Starlette): ``POST /v1/rpc`` plus the OpenAI-compatible routes.

``create_app(settings, bridge=None)`` builds it without reading the environment, so tests and
embedding programs make as many as they like. Every route needs the launch token
(``Authorization: Bearer``, compared in constant time) except the clinician's page and its static
assets (:mod:`android_bridge.page`), which carry no data; a request body over
``settings.max_body_bytes`` gets 413 before it is read; no CORS headers are ever sent, so a web
page from another origin can't read the replies. Logs carry ids, sizes and timings only, never
the token.

``/v1/rpc`` takes one protocol request and streams its replies as NDJSON. The HTTP status is
chosen from the first reply: 200, or the status of its error code when the request failed at
once (400 invalid_request, 409 not_loaded, 413 too_large, 429 busy, 503 loading with
Retry-After, ...). The body is NDJSON either way and always ends with ``done``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from android_bridge.bridge import Bridge, bridge_for
from android_bridge.http import openai, page
from android_bridge.protocol import HTTP_STATUS, dumps, request_id
from android_bridge.settings import ServeSettings

log = logging.getLogger(__name__)
NDJSON = "application/x-ndjson"


class BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: the bearer token and the Content-Length limit, before any route runs."""

    def __init__(self, app, *, token: str, max_body_bytes: int):
        self.app = app
        self.token = token.encode()
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or page.is_public(scope["method"], scope["path"]):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            log.info("http: %s %s refused: body of %s bytes", scope["method"], scope["path"], int(length))
            return await _send_json(
                send, 413, _err("too_large", f"request body over {self.max_body_bytes} bytes"), close=True
            )
        auth = headers.get(b"authorization", b"")
        scheme, _, given = auth.partition(b" ")
        if not (scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)):
            await _drain(receive, self.max_body_bytes)  # keep the connection reusable
            log.info("http: %s %s refused: bad or missing token", scope["method"], scope["path"])
            return await _send_json(
                send,
                401,
                _err("unauthorized", "missing or wrong bearer token (see the endpoint file)"),
                extra=[(b"www-authenticate", b"Bearer")],
            )
        return await self.app(scope, receive, send)


def _err(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message, "type": code}}


async def _drain(receive, limit: int) -> None:
    seen = 0
    while seen <= limit:
        msg = await receive()
        if msg["type"] != "http.request":
            return
        seen += len(msg.get("body", b""))
        if not msg.get("more_body"):
            return


async def _send_json(send, status: int, body: dict, *, extra=(), close: bool = False) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers + list(extra)})
    await send({"type": "http.response.body", "body": data})


async def read_body(request: Request) -> bytes:
    """The body, counted as it arrives (chunked uploads included); BodyTooLarge past the limit."""
    limit = request.app.state.settings.max_body_bytes
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


async def replies(bridge: Bridge, raw: Any) -> AsyncIterator[dict]:
    """Run ``raw`` on a worker thread and yield its replies here as they come.

    If the consumer stops early (the client disconnected), the request is cancelled.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def emit(msg: dict | None) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, msg)

    def finished_() -> None:
        try:
            emit(None)
        except RuntimeError:  # the loop is gone: the server stopped
            pass

    bridge.submit(raw, emit, finished_)
    finished = False
    try:
        while (msg := await queue.get()) is not None:
            yield msg
        finished = True
    finally:
        if not finished:
            rid = request_id(raw) if not isinstance(raw, dict) else raw.get("id")
            if rid and bridge.cancel(rid):
                log.info("http: client left; cancelled %s", rid)


async def rpc(request: Request):
    bridge: Bridge = request.app.state.bridge
    try:
        body = await read_body(request)
    except BodyTooLarge:
        return JSONResponse(
            _err("too_large", "request body too large"), status_code=413, headers={"connection": "close"}
        )
    stream = replies(bridge, body)
    first = await anext(stream)
    status, headers = 200, {}
    if first["type"] == "error":
        status = HTTP_STATUS.get(first["error"]["code"], 500)
        if first["error"].get("retry_after") is not None:
            headers["retry-after"] = str(max(1, math.ceil(first["error"]["retry_after"])))

    async def lines() -> AsyncIterator[str]:
        yield dumps(first) + "\n"
        async for msg in stream:
            yield dumps(msg) + "\n"

    return StreamingResponse(lines(), status_code=status, media_type=NDJSON, headers=headers)


def create_app(settings: ServeSettings, bridge: Bridge | None = None) -> Starlette:
    """The app for ``settings``. Without ``bridge``, one is built over the settings' bundle and
    its models are preloaded in the background (``health`` shows them loading)."""
    if bridge is None:
        bridge = bridge_for(settings)
    bridge.transports.append("http")
    app = Starlette(
        routes=[
            *page.routes(),
            Route("/v1/rpc", rpc, methods=["POST"]),
            Route("/v1/chat/completions", openai.chat_completions, methods=["POST"]),
            Route("/v1/embeddings", openai.embeddings, methods=["POST"]),
            Route("/v1/models", openai.models, methods=["GET"]),
        ],
    )
    app.state.settings = settings
    app.state.bridge = bridge
    app.add_middleware(Guard, token=settings.token, max_body_bytes=settings.max_body_bytes)
    return app
