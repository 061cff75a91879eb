"""Clinic-server mode on a running bridge: :class:`LanMode` holds what ``serve --lan`` adds.

:func:`attach` builds it from the settings (certificate, paired devices, pairing codes, the
queue, the rate limiter, the audit log, all under ``<data_dir>/lan/``) and hangs it on the
bridge as ``bridge.lan``: the ops read it there (the queue in ``generate``, the ``lan_*`` ops),
the HTTP layer reads it from the bridge too (device tokens, ``/v1/pair``, the audit log).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from android_bridge.lan.limits import AuditLog, RateLimiter
from android_bridge.lan.pairing import DeviceRegistry, PairingCodes, PairingRefused, check_name
from android_bridge.lan.queue import FairQueue
from android_bridge.lan.tls import Certificate, ensure_certificate
from edge.errors import InputError

if TYPE_CHECKING:
    from android_bridge.bridge import Bridge
    from android_bridge.settings import LanSettings, ServeSettings

log = logging.getLogger(__name__)


class LanMode:
    """The clinic server's state: ``cert``, ``devices``, ``codes``, ``queue``, ``limiter``, ``audit``."""

    def __init__(self, settings: LanSettings, directory: Path, hosts: tuple[str, ...] = ()):
        self.settings = settings
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.cert: Certificate = ensure_certificate(self.directory / "tls", hosts, days=settings.cert_days)
        self.devices = DeviceRegistry(self.directory / "devices.json")
        self.codes = PairingCodes(ttl_s=settings.pair_ttl_s, attempts=settings.pair_attempts)
        self.queue = FairQueue(settings.queue)
        self.limiter = RateLimiter(settings.rate)
        self.audit = AuditLog(self.directory / "audit.jsonl", max_bytes=settings.audit_max_bytes)

    @property
    def fingerprint(self) -> str:
        return self.cert.fingerprint

    def pair(self, code: object, name: object) -> dict:
        """Exchange a pairing code for a device token.

        Raises:
            InputError: a malformed code or name (400).
            PairingRefused: a wrong, expired, used or burnt code (401).
        """
        name = check_name(name)
        if not isinstance(code, str) or len(code) > 32:
            raise InputError("code must be a string: the 8 digits the server showed")
        if not code.isdigit():
            raise PairingRefused("the pairing code is the 8 digits the server showed")
        self.codes.take(code)
        device, token = self.devices.pair(name)
        return {"token": token, "device_id": device.device_id, "fingerprint": self.fingerprint}

    def revoke(self, device_id: str) -> bool:
        revoked = self.devices.revoke(device_id)
        self.limiter.forget(device_id)
        return revoked

    def health(self) -> dict:
        return {"fingerprint": self.fingerprint, "devices": len(self.devices), "queue": self.queue.state()}


def attach(bridge: Bridge, settings: ServeSettings, hosts: tuple[str, ...] = ()) -> LanMode:
    """Put ``bridge`` in LAN mode (``settings.lan``; kept under ``settings.lan_dir``).

    Queued generations hold a worker thread each while they wait, so the pool grows by the
    queue's bound (cancel and health still find a free worker) and as many more requests may be
    in flight.
    """
    assert settings.lan is not None and settings.lan_dir is not None
    lan = LanMode(settings.lan, settings.lan_dir, hosts or (settings.host,))
    bridge.lan = lan
    bridge.grow(settings.lan.queue)
    bridge.closers.append(lan.devices.flush)
    log.info(
        "lan: clinic-server mode, certificate %s, %d paired device(s)", lan.fingerprint, len(lan.devices)
    )
    return lan
