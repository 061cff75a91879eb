"""Per-device rate limits (token buckets) and the audit log of who asked what, when.

:class:`RateLimiter`: each paired device has a bucket of ``rate`` requests refilled at
``rate`` per minute; a request takes one, and an empty bucket answers how long until the next
(the 429's Retry-After). The launch token (the local admin) is not limited.

:class:`AuditLog`: one JSON line per HTTP request in LAN mode (``time``, ``device``: a
device_id, ``"admin"`` or ``"-"`` when unauthenticated, ``route``, ``op``, ``status``,
``finish``, ``bytes_in``, ``bytes_out``, ``duration_s``), appended to ``audit.jsonl`` and
rotated to ``audit.jsonl.1`` past ``max_bytes``. Never a prompt, an image or a token: the
fields are fixed here and none can carry request content.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

FIELDS = ("time", "device", "route", "op", "status", "finish", "bytes_in", "bytes_out", "duration_s")


class RateLimiter:
    def __init__(self, rate_per_minute: int, *, clock=time.monotonic):
        self.capacity = float(rate_per_minute)
        self.per_s = rate_per_minute / 60.0
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # device -> (tokens, when)
        self._lock = threading.Lock()

    def take(self, device: str) -> float:
        """Take one request from ``device``'s bucket: 0.0 when allowed, else seconds to wait."""
        now = self.clock()
        with self._lock:
            tokens, when = self._buckets.get(device, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - when) * self.per_s)
            if tokens >= 1.0:
                self._buckets[device] = (tokens - 1.0, now)
                return 0.0
            self._buckets[device] = (tokens, now)
            return (1.0 - tokens) / self.per_s

    def forget(self, device: str) -> None:
        with self._lock:
            self._buckets.pop(device, None)


class AuditLog:
    def __init__(self, path: Path, *, max_bytes: int = 8 << 20):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)

    def write(self, **entry) -> None:
        """Append one line (unknown fields are dropped: only :data:`FIELDS` are ever written)."""
        line = {k: entry.get(k) for k in FIELDS}
        if line["time"] is None:
            line["time"] = round(time.time(), 3)
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
        with self._lock:
            try:
                if self.path.exists() and self.path.stat().st_size + len(data) > self.max_bytes:
                    os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                with os.fdopen(fd, "ab") as f:
                    f.write(data)
            except OSError as exc:  # a full disk must not take the server down with it
                log.warning("lan: the audit log could not be written (%s)", type(exc).__name__)
