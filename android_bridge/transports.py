"""Line transports: stdio JSON lines and a Unix socket (Linux), both over ``Bridge.handle``.

One JSON request per line in, one JSON reply per line out. Each request runs on one of the
bridge's worker threads, so a ``cancel`` or ``health`` on the next line is answered while a generation streams; replies
of concurrent requests interleave line by line and are told apart by ``id``. A line longer than
``max_line_bytes`` gets ``too_large`` (and the rest of it is skipped).

(The in-process transport is :func:`android_bridge.bridge.call`; the loopback HTTP one is
:mod:`android_bridge.http.app`.)
"""

from __future__ import annotations

import logging
import os
import socketserver
import threading
from pathlib import Path
from typing import BinaryIO

from android_bridge.bridge import Bridge
from android_bridge.protocol import done, dumps, error
from android_bridge.runtime import RETRY_AFTER_S

log = logging.getLogger(__name__)
MAX_LINE_BYTES = 64 << 20


def serve_lines(
    bridge: Bridge, reader: BinaryIO, writer: BinaryIO, *, max_line_bytes: int = MAX_LINE_BYTES
) -> None:
    """Answer requests read line by line from ``reader`` until EOF or ``shutdown``.

    Returns after every request it started has sent its ``done``.
    """
    write_lock = threading.Lock()
    pending: list = []

    def emit(msg: dict) -> None:
        data = (dumps(msg) + "\n").encode("utf-8")
        with write_lock:
            writer.write(data)
            writer.flush()

    while not bridge.shutting_down.is_set():
        line = reader.readline(max_line_bytes + 1)
        if not line:
            break
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
            while True:  # skip the rest of the oversized line
                rest = reader.readline(1 << 20)
                if not rest or rest.endswith(b"\n"):
                    break
            emit(error(None, "too_large", f"request line over {max_line_bytes} bytes"))
            emit(done(None, "error"))
            continue
        if not line.strip():
            continue
        pending = [f for f in pending if not f.done()] + [bridge.submit(line, emit)]
    for f in pending:
        f.result()


def serve_stdio(bridge: Bridge, *, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> None:
    """The stdio transport: requests on stdin, replies on stdout (logs go to stderr)."""
    import sys

    bridge.transports.append("stdio")
    serve_lines(bridge, stdin or sys.stdin.buffer, stdout or sys.stdout.buffer)


class UnixSocketServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A Unix socket (mode 0600) speaking JSON lines; one connection per client, many requests each.

    Access control is the socket file's permissions: only this user can connect.
    """

    daemon_threads = True

    def __init__(self, path: str | os.PathLike, bridge: Bridge, *, max_connections: int | None = None):
        self.path = Path(path)
        self.bridge = bridge
        self.max_connections = max_connections or bridge.limits.max_connections
        self.connections = 0
        self._count_lock = threading.Lock()
        if self.path.exists() and self.path.is_socket():
            self.path.unlink()  # a stale socket from a previous run
        old = os.umask(0o177)
        try:
            super().__init__(str(self.path), _Connection)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        bridge.transports.append("unix")
        bridge.shutdown_hooks.append(lambda: threading.Thread(target=self.shutdown, daemon=True).start())

    def verify_request(self, request, client_address) -> bool:
        """Take at most ``max_connections`` clients at once; one more gets a ``busy`` error
        line and its ``done``, and is closed."""
        with self._count_lock:
            ok = self.connections < self.max_connections
            if ok:
                self.connections += 1
        if not ok:
            log.info("bridge: unix client refused: %d connections open (the limit)", self.max_connections)
            lines = [
                error(
                    None,
                    "busy",
                    f"{self.max_connections} clients are connected already (the limit)",
                    retry_after=RETRY_AFTER_S,
                ),
                done(None, "error"),
            ]
            try:
                request.sendall("".join(dumps(m) + "\n" for m in lines).encode("utf-8"))
            except OSError:
                pass
        return ok

    def server_close(self) -> None:
        super().server_close()
        self.path.unlink(missing_ok=True)


class _Connection(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        try:
            serve_lines(self.server.bridge, self.rfile, self.wfile)
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            log.info("bridge: unix client went away")

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            with self.server._count_lock:
                self.server.connections -= 1
