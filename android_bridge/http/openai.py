"""OpenAI-compatible routes over the bridge, so existing clients work unchanged.

``/v1/chat/completions`` (``stream: true`` → server-sent ``data:`` chunks ending with
``data: [DONE]``; image parts as ``image_url`` data URLs), ``/v1/embeddings`` (MedSigLIP: a
string input is text, a ``data:image/...`` input is an image; ``encoding_format`` float or
base64), ``/v1/models``. Each is translated into one protocol request and run by the same
``Bridge.handle``; protocol errors become OpenAI-style error bodies with the matching status
and Retry-After (:mod:`android_bridge.http.glue`).
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import AsyncIterator

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from android_bridge.http.glue import BadBody, error_response, read_json, replies, reply_error
from android_bridge.protocol import VERSION

CHAT_MODEL = "medgemma"
EMBED_MODEL = "medsiglip"
_FINISH = {"stop": "stop", "length": "length", "cancelled": "stop", "error": "stop"}


def _generate_params(body: dict) -> dict:
    params: dict = {"messages": body.get("messages")}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    for key, value in (
        ("max_tokens", max_tokens),
        ("temperature", body.get("temperature")),
        ("top_p", body.get("top_p")),
        ("seed", body.get("seed")),
        ("stop", [body["stop"]] if isinstance(body.get("stop"), str) else body.get("stop")),
    ):
        if value is not None:
            params[key] = value
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or not isinstance(fmt.get("json_schema") or {}, dict):
            raise BadBody("invalid_request", "response_format must be an object (type, json_schema)")
        if fmt.get("type") == "json_schema":
            params["schema"] = (fmt.get("json_schema") or {}).get("schema")
    for key in ("stream", "stream_options"):
        if body.get(key) is not None and not isinstance(body[key], bool if key == "stream" else dict):
            raise BadBody(
                "invalid_request", f"{key} must be {'true or false' if key == 'stream' else 'an object'}"
            )
    return params


async def chat_completions(request: Request):
    try:
        body = await read_json(request)
    except BadBody as exc:
        return error_response(exc.code, str(exc), openai=True)
    try:
        params = _generate_params(body)
    except BadBody as exc:
        return error_response(exc.code, str(exc), openai=True)
    rid = f"chatcmpl-{secrets.token_hex(12)}"
    created = int(time.time())
    req = {"v": VERSION, "id": rid, "op": "generate", "params": params}
    stream = replies(request.app.state.bridge, req)
    first = await anext(stream, None)
    if first is None:
        return error_response("not_loaded", "the runtime is shutting down", openai=True)
    if first["type"] == "error":
        await stream.aclose()
        return reply_error(first["error"], openai=True)

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        obj = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": CHAT_MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if usage is not None:
            obj["usage"] = usage
        return f"data: {json.dumps(obj)}\n\n"

    async def all_replies() -> AsyncIterator[dict]:
        yield first
        async for msg in stream:
            yield msg

    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def sse() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""})
            async for msg in all_replies():
                if msg["type"] == "event" and msg["event"] == "token":
                    yield chunk({"content": msg["text"]})
                elif msg["type"] == "error":
                    err = {"error": {"message": msg["error"]["message"], "type": msg["error"]["code"]}}
                    yield f"data: {json.dumps(err)}\n\n"
                elif msg["type"] == "done":
                    yield chunk({}, _FINISH[msg["finish_reason"]])
                    if include_usage:
                        obj = json.loads(chunk({})[6:])
                        obj["choices"], obj["usage"] = [], msg["usage"]
                        yield f"data: {json.dumps(obj)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    text, done, err = "", None, None
    async for msg in all_replies():
        if msg["type"] == "result":
            text = msg["result"]["text"]
        elif msg["type"] == "error":
            err = msg["error"]
        elif msg["type"] == "done":
            done = msg
    if err is not None:
        return reply_error(err, openai=True)
    return JSONResponse(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": CHAT_MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": _FINISH[done["finish_reason"]],
                }
            ],
            "usage": done["usage"],
        }
    )


async def embeddings(request: Request):
    try:
        body = await read_json(request)
    except BadBody as exc:
        return error_response(exc.code, str(exc), openai=True)
    inputs = body.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(x, str) for x in inputs):
        return error_response(
            "invalid_request", "input must be a string or a non-empty list of strings", openai=True
        )
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        return error_response("invalid_request", "encoding_format must be float or base64", openai=True)
    images = [i for i, x in enumerate(inputs) if x.startswith("data:image/")]
    texts = [i for i in range(len(inputs)) if i not in set(images)]
    rows: dict[int, list[float]] = {}
    for op, idx, params in (
        ("embed_text", texts, {"texts": [inputs[i] for i in texts]}),
        ("embed_image", images, {"images": [inputs[i] for i in images]}),
    ):
        if not idx:
            continue
        req = {"v": VERSION, "id": f"emb-{secrets.token_hex(8)}", "op": op, "params": params}
        async for msg in replies(request.app.state.bridge, req):
            if msg["type"] == "error":
                return reply_error(msg["error"], openai=True)
            if msg["type"] == "result":
                rows.update(zip(idx, msg["result"]["embeddings"], strict=True))
    if len(rows) != len(inputs):  # a request that ended without a result (cancelled: shutting down)
        return error_response("cancelled", "the embedding request was cancelled", openai=True)
    data = []
    for i in range(len(inputs)):
        vec = rows[i]
        emb = base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode() if fmt == "base64" else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": EMBED_MODEL,
            "usage": {"prompt_tokens": 0, "total_tokens": 0},
        }
    )


async def models(request: Request):
    rt = request.app.state.bridge.runtime
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "medgemma-edge", "state": s["state"]}
        for name, s in rt.states().items()
        if rt.available(name)
    ]
    return JSONResponse({"object": "list", "data": data})
