"""Run the app under uvicorn: bind, write the endpoint file, stop cleanly.

The socket is bound here (port 0 → a free port) before uvicorn starts, so the URL is known up
front. The endpoint file (JSON: url, host, port, pid, token, page, protocol) is created 0600 in a 0700
directory, written atomically, and removed on exit. On SIGTERM (or the ``shutdown`` op) the
bridge stops taking work and cancels what runs: generations end with ``done(cancelled)`` within
one token, uvicorn lets those streams finish (up to ``grace_s``), then the models are closed.

In clinic-server mode (``settings.lan``) the server speaks TLS with the LAN certificate
(android_bridge.lan.tls), its URLs are ``https://``, and the endpoint file also carries the
certificate's ``fingerprint`` (which devices pin) and ``"lan": true``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

import uvicorn

from android_bridge.bridge import Bridge
from android_bridge.http.app import create_app
from android_bridge.protocol import VERSION
from android_bridge.settings import ServeSettings

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, bridge: Bridge):
        super().__init__(config)
        self.bridge = bridge

    def handle_exit(self, sig, frame) -> None:
        n = self.bridge.cancel_all()
        self.bridge.shutting_down.set()
        log.info("serve: signal %s; cancelling %d request(s)", sig, n)
        super().handle_exit(sig, frame)


class RunningServer:
    """A bound server: ``url``, ``token``, ``bridge``; ``run()`` blocks, ``start()`` uses a thread."""

    def __init__(self, settings: ServeSettings, bridge: Bridge | None = None, *, log_level: str = "warning"):
        self.settings = settings
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((settings.host, settings.port))
        self.sock.listen(128)  # connections made before uvicorn runs wait in the backlog
        self.host, self.port = self.sock.getsockname()[:2]
        self.app = create_app(settings, bridge)
        self.bridge: Bridge = self.app.state.bridge
        cert = self.bridge.lan.cert if self.bridge.lan is not None else None
        tls = {"ssl_certfile": str(cert.cert), "ssl_keyfile": str(cert.key)} if cert is not None else {}
        config = uvicorn.Config(
            self.app,
            log_level=log_level,
            access_log=False,  # the bridge logs ids, sizes and timings itself
            lifespan="off",
            timeout_graceful_shutdown=settings.grace_s,
            # the Guard answers past limits.max_connections with a typed 429 busy; uvicorn's own
            # limit (a plain-text 503, counting idle keep-alive connections too) is only a backstop
            limit_concurrency=2 * settings.limits.max_connections + 8,
            server_header=False,
            **tls,
        )
        self.server = _Server(config, self.bridge)
        self.bridge.shutdown_hooks.append(self.stop)
        self.thread: threading.Thread | None = None
        self.endpoint_file: Path | None = None

    @property
    def url(self) -> str:
        """The server's address from this machine (a wildcard bind is reached on loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.lan else 'http'}://{host}:{self.port}"

    @property
    def lan(self):
        """The bridge's LAN mode (android_bridge.lan.mode.LanMode), or None on loopback."""
        return self.bridge.lan

    @property
    def fingerprint(self) -> str | None:
        """The TLS certificate's SHA-256 (64 lowercase hex) in LAN mode, else None."""
        return self.lan.fingerprint if self.lan is not None else None

    @property
    def page_url(self) -> str:
        """The web page with the token in its fragment: browsers never send a fragment, so the
        token reaches no request line, log or Referer; the page moves it into sessionStorage."""
        return f"{self.url}/#token={self.token}"

    @property
    def token(self) -> str:
        return self.settings.token

    def write_endpoint(self, path: Path) -> Path:
        """Write the endpoint file (0600, atomically)."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "url": self.url,
                    "host": self.host,
                    "port": self.port,
                    "pid": os.getpid(),
                    "token": self.token,
                    "page": self.page_url,
                    "protocol": VERSION,
                    "started": time.time(),
                    **({"lan": True, "fingerprint": self.fingerprint} if self.lan is not None else {}),
                },
                f,
            )
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        self.endpoint_file = path
        return path

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT, the ``shutdown`` op or ``stop()``."""
        try:
            self.server.run(sockets=[self.sock])
        finally:
            if self.endpoint_file is not None:
                self.endpoint_file.unlink(missing_ok=True)

    def start(self, timeout: float = 30.0) -> RunningServer:
        """Serve on a thread; returns once it accepts connections."""
        self.thread = threading.Thread(target=self.run, name="bridge-server", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the bridge server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Ask the server to finish (returns at once; ``join()`` waits)."""
        self.bridge.shutting_down.set()
        self.bridge.cancel_all()
        self.server.should_exit = True

    def join(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)
