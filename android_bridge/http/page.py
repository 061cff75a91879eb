"""The clinician's web page on the loopback server, and the two routes only it needs.

``GET /`` gives browsers (``Accept: text/html``) the page and everyone else the small JSON that
names the server. The page and its assets (``/static/...``, from ``android_bridge/http/web/``) need
no token: they are the same for everyone and carry no data. Every data route does: the page
learns the token from the URL ``serve`` prints, ``http://127.0.0.1:PORT/#token=...`` — a
fragment, which the browser never sends, so the token reaches no server log and no Referer —
and sends it as ``Authorization: Bearer`` like any other client.

Page responses carry a strict Content-Security-Policy: scripts, styles and connections to this
origin only, images also from ``data:``/``blob:`` URLs (previews, thumbnails), no frames, no
plugins, no forms posting elsewhere. The page works with the network unplugged because it
has nothing to fetch from anywhere else.

Routes for the page (token required):

* ``GET /v1/web/config``: upload limits, the structured-report schema and prompt, the
  disclaimer. The page calls it first, so a wrong token shows at once.
* ``POST /v1/preview[?frame=N]``: body = the image file's bytes; reply = the picture the models
  will see (DICOM windowed, EXIF-rotated, ≤ 1024 px PNG data URL) and non-identifying facts.
  Bad images get the protocol's codes and messages: 400 ``invalid_request``, 413 ``too_large``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from android_bridge.http.glue import BodyTooLarge, error_response, read_body
from android_bridge.pictures import PREVIEW_MAX_SIDE, preview
from android_bridge.protocol import VERSION, error_from_exception
from edge.medgemma.generation import DISCLAIMER, builtin_schema
from edge.media.images import MAX_FILE_BYTES, MAX_PIXELS, load_image

log = logging.getLogger(__name__)

WEB = Path(__file__).resolve().parent / "web"
STATIC = {  # the only files served, with their types: nothing else under web/ is reachable
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "files.js": "text/javascript; charset=utf-8",
    "insights.js": "text/javascript; charset=utf-8",
    "shared.js": "text/javascript; charset=utf-8",
    "report.js": "text/javascript; charset=utf-8",
    "image.js": "text/javascript; charset=utf-8",
    "studies.js": "text/javascript; charset=utf-8",
    "signoff.js": "text/javascript; charset=utf-8",
    "diff.js": "text/javascript; charset=utf-8",
    "outbox.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob: data:",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
PAGE_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=(), interest-cohort=()",
}
DATA_HEADERS = {"cache-control": "no-store", "x-content-type-options": "nosniff"}
REPORT_PROMPT = (
    "Draft a structured report of this image for a clinician to review. List each visible "
    "finding with its location and certainty; write a short impression; set needs_review to true."
)
_BODY_OVERHEAD = 4096  # JSON around a base64 image in a /v1/rpc request


def is_public(method: str, path: str) -> bool:
    """Whether a request may go without the token: the page and its static assets only."""
    if method not in ("GET", "HEAD"):
        return False
    return path == "/" or (path.startswith("/static/") and path[len("/static/") :] in STATIC)


def _wants_html(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "text/html" in accept or "application/xhtml+xml" in accept


async def index(request: Request) -> Response:
    """The page for browsers; for API clients the JSON that names the server."""
    if not _wants_html(request):
        return JSONResponse(
            {"name": "medgemma-edge bridge", "protocol": VERSION, "auth": "bearer", "page": "/"}
        )
    html = (WEB / "index.html").read_bytes()
    return Response(
        html,
        media_type="text/html; charset=utf-8",
        headers={**PAGE_HEADERS, "cache-control": "no-store", "vary": "accept"},
    )


async def static(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in STATIC:  # not a protocol error: a plain 404 (no ``type``), as it always was
        return JSONResponse({"error": {"code": "not_found", "message": "no such file"}}, status_code=404)
    return Response(
        (WEB / name).read_bytes(),
        media_type=STATIC[name],
        headers={**PAGE_HEADERS, "cache-control": "no-cache"},
    )


def limits(max_body_bytes: int) -> dict:
    """What the page checks before uploading: the largest image file (its base64 must fit in
    one request body) and the pixel limit the runtime enforces per frame."""
    by_body = (max_body_bytes - _BODY_OVERHEAD) * 3 // 4
    return {
        "max_upload_bytes": max(0, min(MAX_FILE_BYTES, by_body)),
        "max_image_pixels": MAX_PIXELS,
        "max_body_bytes": max_body_bytes,
    }


async def config(request: Request) -> Response:
    settings = request.app.state.settings
    body = {
        "protocol": VERSION,
        "limits": limits(settings.max_body_bytes),
        "report": {"schema": builtin_schema("report"), "prompt": REPORT_PROMPT},
        "disclaimer": DISCLAIMER,
        "preview_max_side": PREVIEW_MAX_SIDE,
    }
    return JSONResponse(body, headers=DATA_HEADERS)


async def preview_route(request: Request) -> Response:
    try:
        data = await read_body(request)
    except BodyTooLarge:
        return error_response(
            "too_large", "the image is larger than this runtime accepts in one request", headers=DATA_HEADERS
        )
    frame_arg = request.query_params.get("frame")
    if frame_arg is not None and not frame_arg.isdigit():
        return error_response("invalid_request", "frame must be a whole number", headers=DATA_HEADERS)
    frame = int(frame_arg) if frame_arg is not None else None
    t0 = time.perf_counter()

    def work() -> dict:
        return preview(load_image(data, frame=frame))

    try:
        body = await run_in_threadpool(work)
    except Exception as exc:  # the protocol's codes and messages for bad images
        reply = error_from_exception(None, exc)["error"]
        if reply["code"] == "internal" and not hasattr(exc, "code"):
            log.exception("preview failed")
        log.info("http: preview of %d bytes refused (%s)", len(data), reply["code"])
        return error_response(reply["code"], reply["message"], headers=DATA_HEADERS)
    log.info(
        "http: preview of %d bytes (%s) in %.0f ms",
        len(data),
        body["format"],
        (time.perf_counter() - t0) * 1e3,
    )
    return JSONResponse(body, headers=DATA_HEADERS)


def routes() -> list[Route]:
    return [
        Route("/", index, methods=["GET"]),
        Route("/static/{name}", static, methods=["GET"]),
        Route("/v1/web/config", config, methods=["GET"]),
        Route("/v1/preview", preview_route, methods=["POST"]),
    ]
