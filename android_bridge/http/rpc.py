"""``POST /v1/rpc``: one protocol request in the body, its replies streamed back as NDJSON.

The HTTP status is chosen from the first reply (:func:`~android_bridge.http.glue.first_reply_status`):
200, or the status of its error code when the request failed at once (400 invalid_request,
409 not_loaded, 413 too_large, 429 busy, 503 loading with Retry-After, ...). The body is NDJSON
either way and always ends with ``done``. A body over the limit gets 413 and a JSON error body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from android_bridge.bridge import Bridge
from android_bridge.http.glue import BodyTooLarge, error_response, first_reply_status, read_body, replies
from android_bridge.protocol import done, dumps, error, request_id

NDJSON = "application/x-ndjson"


async def rpc(request: Request) -> Response:
    """Run the body's request on the app's bridge and stream its replies, one JSON line each."""
    bridge: Bridge = request.app.state.bridge
    try:
        body = await read_body(request)
    except BodyTooLarge as exc:
        return error_response(exc.code, str(exc), headers={"connection": "close"})
    stream = replies(bridge, body)
    first = await anext(stream, None)
    if first is None:  # the worker pool is gone: the runtime stopped while the request waited
        first = error(request_id(body), "not_loaded", "the runtime is shutting down")
        stream = _ended(request_id(body))
    status, headers = first_reply_status(first)

    async def lines() -> AsyncIterator[str]:
        yield dumps(first) + "\n"
        async for msg in stream:
            yield dumps(msg) + "\n"

    return StreamingResponse(lines(), status_code=status, media_type=NDJSON, headers=headers)


async def _ended(rid: str | None) -> AsyncIterator[dict]:
    yield done(rid, "error")
