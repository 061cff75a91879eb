"""The bridge protocol, version 1: message shapes, request parsing, error codes.

A request is one JSON object ``{"v": 1, "id": "...", "op": "...", "params": {...}}``. Every reply
carries ``v``, ``id`` and ``type``: ``event`` (token, progress, state), ``result``, ``error``,
and always, last, one ``done`` with ``finish_reason`` (stop | length | cancelled | error),
``usage`` and ``timings``. PROTOCOL.md beside this file is the reference; this module is the
one place the shapes are built, so the two are kept in step here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from edge.errors import EdgeError

VERSION = 1
OPS = (
    "health",
    "load",
    "unload",
    "generate",
    "prepare_image",
    "embed_image",
    "embed_text",
    "classify",
    "search_similar",
    "cancel",
    "shutdown",
)
ERROR_CODES = (
    "loading",
    "not_loaded",
    "busy",
    "out_of_memory",
    "invalid_request",
    "too_large",
    "cancelled",
    "internal",
)
FINISH_REASONS = ("stop", "length", "cancelled", "error")
MODELS = ("medgemma", "medsiglip")
STATES = ("uninitialized", "loading", "ready", "generating", "error")
# HTTP status for an error code, used where a transport has statuses (the loopback server).
HTTP_STATUS = {
    "loading": 503,
    "not_loaded": 409,
    "busy": 429,
    "out_of_memory": 507,
    "invalid_request": 400,
    "too_large": 413,
    "cancelled": 499,
    "internal": 500,
}
_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class ProtocolError(EdgeError):
    """A request the bridge can't act on; ``code`` is its protocol error code.

    ``retry_after`` (seconds) is set for ``loading`` and ``busy``.
    """

    def __init__(self, code: str, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        assert code in ERROR_CODES, code
        self.code = code
        self.retry_after = retry_after


@dataclass
class Request:
    """A parsed, validated request."""

    id: str
    op: str
    params: dict = field(default_factory=dict)


def parse_request(raw: Any) -> Request:
    """Validate one request (bytes, str or an already-decoded object).

    Raises:
        ProtocolError(invalid_request): not JSON, not an object, a missing or malformed id,
            an unknown version or op, params that are not an object. The error's reply keeps
            the request's id when one could be read (see :func:`request_id`).
    """
    obj = decode(raw)
    if obj.get("v") != VERSION:
        raise ProtocolError(
            "invalid_request",
            f"unsupported protocol version {obj.get('v')!r}: this runtime speaks v{VERSION}",
        )
    rid = obj.get("id")
    if not isinstance(rid, str) or not _ID.match(rid):
        raise ProtocolError("invalid_request", "request id must be a string of 1-128 letters, digits or ._:-")
    op = obj.get("op")
    if op not in OPS:
        raise ProtocolError("invalid_request", f"unknown op {op!r}; one of: {', '.join(OPS)}")
    params = obj.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ProtocolError("invalid_request", "params must be a JSON object")
    return Request(rid, op, params)


def decode(raw: Any) -> dict:
    """JSON text/bytes → a dict, or ProtocolError(invalid_request)."""
    if isinstance(raw, bytes | bytearray | str):
        try:
            raw = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError("invalid_request", f"request is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ProtocolError("invalid_request", "request must be a JSON object")
    return raw


def request_id(raw: Any) -> str | None:
    """The id of a request that failed to parse, when it has a usable one (else None)."""
    try:
        rid = decode(raw).get("id")
    except ProtocolError:
        return None
    return rid if isinstance(rid, str) and _ID.match(rid) else None


# -- replies ----------------------------------------------------------------------------------


def event(rid: str | None, kind: str, **fields: Any) -> dict:
    return {"v": VERSION, "id": rid, "type": "event", "event": kind, **fields}


def result(rid: str | None, value: dict) -> dict:
    return {"v": VERSION, "id": rid, "type": "result", "result": value}


def error(rid: str | None, code: str, message: str, *, retry_after: float | None = None) -> dict:
    err: dict[str, Any] = {"code": code, "message": message}
    if retry_after is not None:
        err["retry_after"] = retry_after
    return {"v": VERSION, "id": rid, "type": "error", "error": err}


def done(
    rid: str | None, finish_reason: str, *, usage: dict | None = None, timings: dict | None = None
) -> dict:
    assert finish_reason in FINISH_REASONS, finish_reason
    return {
        "v": VERSION,
        "id": rid,
        "type": "done",
        "finish_reason": finish_reason,
        "usage": usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        "timings": timings or {},
    }


def error_from_exception(rid: str | None, exc: BaseException) -> dict:
    """The error reply for an exception: library errors keep their code; anything else is
    ``internal`` with a generic message (its details go to the log, not to the client)."""
    if isinstance(exc, ProtocolError):
        return error(rid, exc.code, str(exc), retry_after=exc.retry_after)
    if isinstance(exc, EdgeError):
        code = exc.code if exc.code in ERROR_CODES else "internal"
        return error(rid, code, str(exc))
    if isinstance(exc, MemoryError):
        return error(rid, "out_of_memory", "the device ran out of memory for this request")
    return error(rid, "internal", f"internal error ({type(exc).__name__}); see the runtime's log")


def dumps(msg: dict) -> str:
    """One reply as a JSON line (no newline)."""
    return json.dumps(msg, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
