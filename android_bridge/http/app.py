"""The loopback HTTP app (Starlette): ``POST /v1/rpc`` plus the OpenAI-compatible routes and the page.

``create_app(settings, bridge=None)`` builds it without reading the environment, so tests and
embedding programs make as many as they like. Every route needs the launch token
(``Authorization: Bearer``, compared in constant time) except the clinician's page and its static
assets (:mod:`android_bridge.http.page`), which carry no data; a request body whose
Content-Length is over ``settings.max_body_bytes`` gets 413 before it is read (a chunked one is
counted as it arrives, :func:`android_bridge.http.glue.read_body`); no CORS headers are ever
sent, so a web page from another origin can't read the replies. Logs carry ids, sizes and
timings only, never the token.

The routes: :mod:`.rpc` (``/v1/rpc``), :mod:`.openai`, :mod:`.page`; what they share (error
bodies, statuses, Retry-After, the body limit) is in :mod:`.glue`.

Clinic-server mode (``settings.lan``, android_bridge.lan): the bridge is put in LAN mode, the
guard also accepts a paired device's token (each device rate limited; the launch token stays
the admin's, unlimited), ``POST /v1/pair`` is added (no token), and every request is audited
(:class:`android_bridge.lan.http.Audit`). TLS itself is the server's (:mod:`.server`).
"""

from __future__ import annotations

import hmac
import logging
import math
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Route

from android_bridge.bridge import ADMIN, AUDIT, CALLER, Bridge, bridge_for
from android_bridge.http import openai, page
from android_bridge.http.glue import send_error
from android_bridge.http.rpc import rpc
from android_bridge.lan import http as lan_http
from android_bridge.runtime import RETRY_AFTER_S
from android_bridge.settings import ServeSettings

log = logging.getLogger(__name__)


class Guard:
    """ASGI middleware: the bearer token, the Content-Length limit and the cap on concurrent
    requests (``max_connections``: past it, ``429 busy`` with Retry-After), before any route runs.

    With ``lan`` (android_bridge.lan.mode.LanMode) a paired device's token is accepted too, and
    each device is held to its rate limit (``429 busy`` with Retry-After). The caller (``admin``
    or the device's id) is set in :data:`android_bridge.bridge.CALLER` for the bridge."""

    def __init__(
        self, app, *, token: str, max_body_bytes: int, max_connections: int | None = None, lan: Any = None
    ):
        self.app = app
        self.token = token.encode()
        self.max_body_bytes = max_body_bytes
        self.max_connections = max_connections
        self.lan = lan
        self.active = 0  # requests being answered now (one event loop: no lock needed)

    def _caller(self, given: bytes) -> str | None:
        """``admin`` for the launch token, a device's id for its token, else None."""
        if hmac.compare_digest(given, self.token):
            return ADMIN
        if self.lan is not None and given:
            device = self.lan.devices.lookup(given.decode("latin-1"))
            if device is not None:
                return device.device_id
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or page.is_public(scope["method"], scope["path"]):
            return await self.app(scope, receive, send)
        if self.lan is not None and lan_http.is_public(scope["method"], scope["path"]):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            log.info("http: %s %s refused: body of %s bytes", scope["method"], scope["path"], int(length))
            return await send_error(
                send, 413, "too_large", f"request body over {self.max_body_bytes} bytes", close=True
            )
        auth = headers.get(b"authorization", b"")
        scheme, _, given = auth.partition(b" ")
        caller = self._caller(given.strip()) if scheme.lower() == b"bearer" else None
        if caller is None:
            await _drain(receive, self.max_body_bytes)  # keep the connection reusable
            log.info("http: %s %s refused: bad or missing token", scope["method"], scope["path"])
            return await send_error(
                send,
                401,
                "unauthorized",
                "missing or wrong bearer token (see the endpoint file)",
                headers=((b"www-authenticate", b"Bearer"),),
            )
        note = AUDIT.get()
        if note is not None:
            note["device"] = caller
        if caller != ADMIN:
            wait = self.lan.limiter.take(caller)
            if wait > 0:
                await _drain(receive, self.max_body_bytes)
                log.info("http: %s %s refused: %s over its rate", scope["method"], scope["path"], caller)
                return await send_error(
                    send,
                    429,
                    "busy",
                    f"this device is over its {self.lan.settings.rate} requests a minute; retry later",
                    headers=((b"retry-after", str(max(1, math.ceil(wait))).encode()),),
                )
        if self.max_connections is not None and self.active >= self.max_connections:
            await _drain(receive, self.max_body_bytes)
            log.info("http: %s %s refused: %d requests at once", scope["method"], scope["path"], self.active)
            return await send_error(
                send,
                429,
                "busy",
                f"{self.active} requests are being answered already (the limit); retry shortly",
                headers=((b"retry-after", str(max(1, math.ceil(RETRY_AFTER_S))).encode()),),
            )
        self.active += 1
        token = CALLER.set(caller)
        try:
            return await self.app(scope, receive, send)
        finally:
            CALLER.reset(token)
            self.active -= 1


async def _drain(receive, limit: int) -> None:
    """Read and drop a refused request's body (up to ``limit`` bytes), so the connection stays usable."""
    seen = 0
    while seen <= limit:
        msg = await receive()
        if msg["type"] != "http.request":
            return
        seen += len(msg.get("body", b""))
        if not msg.get("more_body"):
            return


def create_app(settings: ServeSettings, bridge: Bridge | None = None) -> Starlette:
    """The app for ``settings``. Without ``bridge``, one is built over the settings' bundle and
    its models are preloaded in the background (``health`` shows them loading). With
    ``settings.lan`` the bridge is put in LAN mode (android_bridge.lan.mode.attach) unless it
    already is."""
    if bridge is None:
        bridge = bridge_for(settings)
    lan = None
    if settings.lan is not None:
        from android_bridge.lan.mode import attach

        lan = bridge.lan or attach(bridge, settings)
    bridge.transports.append("https" if lan is not None else "http")
    app = Starlette(
        routes=[
            *page.routes(),
            Route("/v1/rpc", rpc, methods=["POST"]),
            Route("/v1/chat/completions", openai.chat_completions, methods=["POST"]),
            Route("/v1/embeddings", openai.embeddings, methods=["POST"]),
            Route("/v1/models", openai.models, methods=["GET"]),
            *([Route(lan_http.PAIR_PATH, lan_http.pair, methods=["POST"])] if lan is not None else []),
        ],
    )
    app.state.settings = settings
    app.state.bridge = bridge
    app.add_middleware(
        Guard,
        token=settings.token,
        max_body_bytes=settings.max_body_bytes,
        max_connections=settings.limits.max_connections,
        lan=lan,
    )
    if lan is not None:  # added last: outermost, so it sees every request and every refusal
        app.add_middleware(lan_http.Audit, audit=lan.audit)
    return app
