"""Pairing and device tokens: short-lived codes exchanged once for a device's own token.

:class:`PairingCodes` makes 8-digit codes with :mod:`secrets` (valid ``ttl_s``, single use). A
failed attempt can't be told apart from a guess at *some* open code, so failures are counted
across all codes: at ``attempts`` failures within a minute every open code is burnt (the admin
makes a new one) and further attempts are refused with :class:`PairingThrottled` (HTTP 429) until
the oldest failure is a minute old. An 8-digit code with 5 tries has a 1 in 20 million chance of
being guessed.

:class:`DeviceRegistry` keeps the paired devices in ``devices.json`` (0600, atomic writes): for
each, its id, name, created and last_seen times and the SHA-256 of its token. The token itself
is shown once, to the device that paired, and never stored. Looking a token up hashes it and
finds the hash (the hash of a 256-bit secret leaks nothing about another token); a revoked
device is gone from the table, so its token gets 401 on its next request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from edge.errors import InputError
from edge.files import read_bytes

log = logging.getLogger(__name__)

FORMAT = "medgemma-edge-lan-devices/1"
CODE_DIGITS = 8
MAX_OPEN_CODES = 16
MAX_NAME_CHARS = 64
MAX_REGISTRY_BYTES = 16 << 20  # devices.json (some 300 bytes a device)
LAST_SEEN_EVERY_S = 60.0  # last_seen is written to disk at most this often per device


class PairingRefused(Exception):
    """A pairing attempt that failed: a wrong, expired, used or burnt code (HTTP 401)."""


class PairingThrottled(PairingRefused):
    """Too many failed pairing attempts in the last minute: retry after ``retry_after`` s (429)."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class PairingCodes:
    """Open pairing codes; ``take(code)`` uses one up."""

    def __init__(self, *, ttl_s: float = 300.0, attempts: int = 5, clock=time.monotonic):
        self.ttl_s = ttl_s
        self.attempts = attempts
        self.clock = clock
        self._codes: dict[str, float] = {}  # code -> expiry (monotonic)
        self._failures: deque[float] = deque()
        self._lock = threading.Lock()

    def new(self) -> tuple[str, float]:
        """A fresh code and its lifetime in seconds (the oldest open code goes past 16)."""
        code = "".join(secrets.choice("0123456789") for _ in range(CODE_DIGITS))
        with self._lock:
            self._purge()
            while len(self._codes) >= MAX_OPEN_CODES:
                self._codes.pop(min(self._codes, key=self._codes.__getitem__))
            self._codes[code] = self.clock() + self.ttl_s
        return code, self.ttl_s

    def _purge(self) -> None:
        now = self.clock()
        for code in [c for c, t in self._codes.items() if t <= now]:
            del self._codes[code]

    def take(self, code: str) -> None:
        """Use ``code`` up.

        Raises:
            PairingRefused: not an open code; the failure counts against all open codes.
        """
        given = code.encode()
        with self._lock:
            self._purge()
            now = self.clock()
            while self._failures and self._failures[0] <= now - 60.0:
                self._failures.popleft()
            if len(self._failures) >= self.attempts:
                raise PairingThrottled(
                    f"{self.attempts} failed pairing attempts in the last minute: wait, then ask for a new code",
                    retry_after=max(1.0, self._failures[0] + 60.0 - now),
                )
            match = None
            for open_code in list(self._codes):  # compare with each one in constant time
                if hmac.compare_digest(open_code.encode(), given):
                    match = open_code
            if match is not None:
                del self._codes[match]
                return
            self._failures.append(now)
            if len(self._failures) >= self.attempts:
                burnt = len(self._codes)
                self._codes.clear()
                log.warning(
                    "lan: %d failed pairing attempts in a minute; %d open code(s) burnt", self.attempts, burnt
                )
        raise PairingRefused("wrong, expired or already used pairing code; ask for a new one")

    @property
    def open(self) -> int:
        with self._lock:
            self._purge()
            return len(self._codes)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_name(name: object) -> str:
    """A device's name as given at pairing: 1-64 printable characters (spaces trimmed).

    Raises:
        InputError: anything else.
    """
    if not isinstance(name, str) or not 0 < len(name.strip()) <= MAX_NAME_CHARS or not name.isprintable():
        raise InputError(f"device must be a name of 1 to {MAX_NAME_CHARS} printable characters")
    return name.strip()


@dataclass
class Device:
    device_id: str
    name: str
    token_sha256: str
    created: float
    last_seen: float | None = None

    def public(self) -> dict:
        """What ``lan_devices`` shows: everything but the token's hash."""
        return {
            "device_id": self.device_id,
            "name": self.name,
            "created": self.created,
            "last_seen": self.last_seen,
        }


class DeviceRegistry:
    """The paired devices, in ``path`` (``<data_dir>/lan/devices.json``)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._by_hash: dict[str, Device] = {}
        self._written: dict[str, float] = {}  # device_id -> last_seen as last written
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        try:
            data = json.loads(read_bytes(self.path, limit=MAX_REGISTRY_BYTES, what="the paired devices"))
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            devices = [Device(**d) for d in data["devices"]]
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise InputError(
                f"{self.path} can't be read ({type(exc).__name__}: {str(exc)[:80]}); fix or remove it "
                "(removing it unpairs every device)"
            ) from None
        self._by_hash = {d.token_sha256: d for d in devices}
        self._written = {d.device_id: d.last_seen or 0.0 for d in devices}

    def _write(self) -> None:
        """devices.json, atomically (0600). Called with the lock held."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        body = {"format": FORMAT, "devices": [vars(d) for d in self._by_hash.values()]}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(body, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        self._written = {d.device_id: d.last_seen or 0.0 for d in self._by_hash.values()}

    def pair(self, name: str) -> tuple[Device, str]:
        """A new device and its token (the only time the token exists in clear)."""
        token = secrets.token_hex(32)
        device = Device(f"dev-{secrets.token_hex(6)}", check_name(name), hash_token(token), time.time())
        with self._lock:
            self._by_hash[device.token_sha256] = device
            self._write()
        log.info("lan: paired %s", device.device_id)
        return device, token

    def lookup(self, token: str) -> Device | None:
        """The device whose token this is (its last_seen updated), or None."""
        device = self._by_hash.get(hash_token(token))
        if device is not None:
            now = time.time()
            device.last_seen = now
            if now - self._written.get(device.device_id, 0.0) > LAST_SEEN_EVERY_S:
                with self._lock:
                    if device.token_sha256 in self._by_hash:
                        self._write()
        return device

    def revoke(self, device_id: str) -> bool:
        """Forget ``device_id``: its token is refused from now on. False when there was none."""
        with self._lock:
            hits = [h for h, d in self._by_hash.items() if d.device_id == device_id]
            for h in hits:
                del self._by_hash[h]
            if hits:
                self._write()
        if hits:
            log.info("lan: revoked %s", device_id)
        return bool(hits)

    def list(self) -> list[dict]:
        with self._lock:
            return sorted((d.public() for d in self._by_hash.values()), key=lambda d: d["created"])

    def __len__(self) -> int:
        return len(self._by_hash)

    def flush(self) -> None:
        """Write last_seen times not yet on disk (at shutdown)."""
        with self._lock:
            if any((d.last_seen or 0.0) != self._written.get(d.device_id) for d in self._by_hash.values()):
                self._write()
