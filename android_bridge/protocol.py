"""The bridge protocol, version 1: message shapes, request parsing, error codes.

A request is one JSON object ``{"v": 1, "id": "...", "op": "...", "params": {...}}``. Every reply
carries ``v``, ``id`` and ``type``: ``event`` (token, progress, state), ``result``, ``error``,
and always, last, one ``done`` with ``finish_reason`` (stop | length | cancelled | error),
``usage`` and ``timings``. PROTOCOL.md beside this file is the reference; this module is the
one place the shapes are built, so the two are kept in step here.
"""

from __future__ import annotations

import json
import math
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
    "list_studies",
    "get_study",
    "preview_image",
    "save_report",
    "sign_report",
    "amend_report",
    "list_reports",
    "get_report",
    "export_report",
    "send_report",
    "outbox",
)
LAN_OPS = ("lan_pair_code", "lan_devices", "lan_revoke")  # clinic-server mode's admin ops (serve --lan)
ERROR_CODES = (
    "loading",
    "not_loaded",
    "busy",
    "out_of_memory",
    "invalid_request",
    "too_large",
    "cancelled",
    "internal",
    "not_found",
    "conflict",
    "forbidden",
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
    "not_found": 404,
    "conflict": 409,
    "forbidden": 403,
}
_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
MAX_REQUEST_BYTES = 64 << 20  # one request, as text (the line and HTTP transports cut at the same size)
MAX_DEPTH = 32  # nesting of objects and arrays in a request (a schema or a conversation needs < 16)


class ProtocolError(EdgeError):
    """A request the bridge can't act on; ``code`` is its protocol error code.

    ``retry_after`` (seconds) is set for ``loading`` and ``busy``.
    """

    def __init__(self, code: str, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        assert code in ERROR_CODES, code
        self.code = code
        self.retry_after = retry_after
        self.request_id: str | None = None  # set by parse_request when the request has a usable id


@dataclass
class Request:
    """A parsed, validated request."""

    id: str
    op: str
    params: dict = field(default_factory=dict)


def parse_request(raw: Any) -> Request:
    """Validate one request (bytes, str or an already-decoded object).

    Raises:
        ProtocolError(invalid_request): not JSON (or NaN/Infinity, a lone surrogate, nested
            deeper than :data:`MAX_DEPTH`), not an object, a missing or malformed id, an unknown
            version or op, params that are not an object. ``request_id`` is set on the error
            when the request had a usable id.
        ProtocolError(too_large): over :data:`MAX_REQUEST_BYTES`.
    """
    obj = decode(raw)
    rid = obj.get("id")
    rid = rid if isinstance(rid, str) and _ID.match(rid) else None
    try:  # the error's reply keeps the id from here on
        return _validate(obj, rid)
    except ProtocolError as exc:
        exc.request_id = rid
        raise


def _validate(obj: dict, rid: str | None) -> Request:
    if obj.get("v") != VERSION:
        raise ProtocolError(
            "invalid_request",
            f"unsupported protocol version {short(obj.get('v'))}: this runtime speaks v{VERSION}",
        )
    if rid is None:
        raise ProtocolError("invalid_request", "request id must be a string of 1-128 letters, digits or ._:-")
    op = obj.get("op")
    if op not in OPS and op not in LAN_OPS:
        raise ProtocolError("invalid_request", f"unknown op {short(op)}; one of: {', '.join(OPS)}")
    params = obj.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ProtocolError("invalid_request", "params must be a JSON object")
    return Request(rid, op, params)


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages that name what was sent."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def loads(raw: bytes | bytearray | str, *, what: str = "request", details: bool = True) -> Any:
    """Strict JSON: no NaN/Infinity, no number that overflows a float, nesting at most
    :data:`MAX_DEPTH`, valid UTF-8 / Unicode (no lone surrogates), at most
    :data:`MAX_REQUEST_BYTES`. Every route and transport parses requests with it.

    Raises:
        ProtocolError(invalid_request | too_large).
    """
    value = _parse(raw, what=what, details=details)
    check_tree(value)
    return value


def _parse(raw: bytes | bytearray | str, *, what: str = "request", details: bool = True) -> Any:
    if len(raw) > MAX_REQUEST_BYTES:
        raise ProtocolError("too_large", f"{what} over {MAX_REQUEST_BYTES} bytes")
    try:
        return json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise ProtocolError("invalid_request", f"{what} is nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        why = f" ({str(exc)[:200]})" if details else ""
        raise ProtocolError("invalid_request", f"{what} is not valid JSON{why}") from None


_SCALARS = (str, int, float, bool, type(None))


def check_tree(value: Any) -> None:
    """Refuse what JSON text can't carry or this runtime won't take, walking without recursion:
    nesting deeper than :data:`MAX_DEPTH`, non-finite numbers, strings that aren't valid Unicode
    (lone surrogates, from ``\\ud800`` escapes), keys that aren't strings, non-JSON types (an
    in-process caller's objects)."""
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth >= MAX_DEPTH:
                raise ProtocolError("invalid_request", f"request is nested deeper than {MAX_DEPTH} levels")
            if isinstance(node, dict):
                for key, item in node.items():
                    if not isinstance(key, str):
                        raise ProtocolError("invalid_request", "object keys must be strings")
                    _check_text(key)
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in node)
        elif isinstance(node, str):
            _check_text(node)
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise ProtocolError("invalid_request", "numbers must be finite (no NaN or Infinity)")
        elif not isinstance(node, _SCALARS):
            raise ProtocolError(
                "invalid_request", f"a request holds JSON values only, not {type(node).__name__}"
            )


def _check_text(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError(
                "invalid_request", "request text is not valid Unicode (a lone surrogate escape)"
            ) from None


def decode(raw: Any) -> dict:
    """JSON text/bytes (or a decoded object, checked the same way) → a dict, or ProtocolError
    (with ``request_id`` set when the object had a usable id)."""
    obj = _parse(raw) if isinstance(raw, bytes | bytearray | str) else raw
    try:
        check_tree(obj)
    except ProtocolError as exc:
        rid = obj.get("id") if isinstance(obj, dict) else None
        exc.request_id = rid if isinstance(rid, str) and _ID.match(rid) else None
        raise
    if not isinstance(obj, dict):
        raise ProtocolError("invalid_request", "request must be a JSON object")
    return obj


def request_id(raw: Any) -> str | None:
    """The id of a request that failed to parse, when it has a usable one (else None). Never raises."""
    try:
        rid = decode(raw).get("id")
    except ProtocolError as exc:  # the id of an object that parsed but broke a rule (depth, NaN)
        return exc.request_id
    except Exception:
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
