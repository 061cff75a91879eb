"""The HTTP glue every route shares: error bodies, statuses, Retry-After, the body limit, replies.

Written once here and used by ``/v1/rpc`` (:mod:`.rpc`), the OpenAI routes (:mod:`.openai`), the
page (:mod:`.page`) and the token guard (:mod:`.app`):

* :func:`error_body` — the two error shapes the API speaks: the bridge's
  ``{"error": {"code", "message", "type"}}`` (``/v1/rpc``, the guard, the page) and OpenAI's
  ``{"error": {"message", "type", "code", "param"}}`` (``/v1/chat/completions``, ``/v1/embeddings``).
  :func:`error_response` and :func:`send_error` (raw ASGI, for the guard) send them.
* :func:`status_for` — a protocol error code → its HTTP status (:data:`HTTP_STATUS`, 500 for an
  unknown code) and a ``Retry-After`` header (whole seconds, at least 1) when the error has
  ``retry_after``. :func:`error_response` and :func:`first_reply_status` both use it.
* :func:`read_body` / :func:`read_json` — the request body counted as it arrives (chunked uploads
  included), :class:`BodyTooLarge` past ``settings.max_body_bytes``; :class:`BadBody` for a body
  that is not a JSON object.
* :func:`replies` — one protocol request run on the bridge's workers, its replies yielded here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from android_bridge.bridge import Bridge
from android_bridge.protocol import HTTP_STATUS, ProtocolError, loads, request_id

log = logging.getLogger(__name__)


class BadBody(ProtocolError):
    """A request body the route can't use: not JSON, not a JSON object (``invalid_request``)."""


class BodyTooLarge(BadBody):
    """A request body over ``settings.max_body_bytes`` (``too_large``)."""

    def __init__(self, message: str = "request body too large"):
        super().__init__("too_large", message)


def error_body(code: str, message: str, *, openai: bool = False) -> dict:
    """The JSON error body for ``code``: the bridge's shape, or OpenAI's with ``openai=True``."""
    if openai:
        return {"error": {"message": message, "type": code, "code": code, "param": None}}
    return {"error": {"code": code, "message": message, "type": code}}


def status_for(code: str, retry_after: float | None = None) -> tuple[int, dict[str, str]]:
    """The HTTP status of a protocol error code, and its headers (``retry-after`` when given)."""
    headers = {"retry-after": str(max(1, math.ceil(retry_after)))} if retry_after is not None else {}
    return HTTP_STATUS.get(code, 500), headers


def error_response(
    code: str,
    message: str,
    *,
    openai: bool = False,
    retry_after: float | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """A JSON error reply: :func:`error_body`, with the status and Retry-After of :func:`status_for`.

    Args:
        headers: extra headers (the page's ``cache-control``, ``connection: close``).
    """
    status, extra = status_for(code, retry_after)
    return JSONResponse(
        error_body(code, message, openai=openai), status_code=status, headers={**extra, **(headers or {})}
    )


async def send_error(
    send, status: int, code: str, message: str, *, headers: tuple = (), close: bool = False
) -> None:
    """:func:`error_body` as a raw ASGI reply, for middleware that answers before any route runs.

    Args:
        headers: extra ``(name, value)`` byte pairs, sent after the standard ones.
        close: ask the client to close the connection (the rest of the body is not read).
    """
    data = json.dumps(error_body(code, message)).encode()
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if close:
        start.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": start + list(headers)})
    await send({"type": "http.response.body", "body": data})


def reply_error(err: dict, *, openai: bool = False) -> JSONResponse:
    """:func:`error_response` for a protocol reply's ``error`` object (code, message, retry_after?)."""
    return error_response(err["code"], err["message"], openai=openai, retry_after=err.get("retry_after"))


def first_reply_status(first: dict) -> tuple[int, dict[str, str]]:
    """The status of a streamed reply, decided by its first message: 200, or, when the request
    failed at once, its error code's status (with Retry-After for ``loading`` and ``busy``)."""
    if first["type"] != "error":
        return 200, {}
    return status_for(first["error"]["code"], first["error"].get("retry_after"))


async def read_body(request: Request) -> bytes:
    """The body, counted as it arrives (chunked uploads included).

    Raises:
        BodyTooLarge: past ``settings.max_body_bytes``; the rest is not read.
    """
    limit = request.app.state.settings.max_body_bytes
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request) -> dict:
    """The body as a JSON object.

    Raises:
        BodyTooLarge: over the limit.
        BadBody: not valid JSON (by :func:`android_bridge.protocol.loads`: no NaN, nesting
            bounded, valid Unicode), or not an object (``invalid_request``).
    """
    data = await read_body(request)
    try:
        body = loads(data, what="the body", details=False)
    except ProtocolError as exc:  # not JSON, NaN, too deep, a lone surrogate: the protocol's rules
        raise BadBody(exc.code, str(exc)) from None
    if not isinstance(body, dict):
        raise BadBody("invalid_request", "the body must be a JSON object")
    return body


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
