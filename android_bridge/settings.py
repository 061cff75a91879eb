"""The server's settings: one dataclass behind the CLI flags and the tests' app factory (loopback,
and the clinic-server mode's :class:`LanSettings`)."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.medgemma.settings import MedGemmaSettings
from edge.medsiglip.settings import MedSigLIPSettings
from edge.settings import check, setting

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def default_endpoint_file() -> Path:
    """Where ``serve`` writes its endpoint (host, port, pid, token): a per-user, 0700 directory."""
    base = os.environ.get("XDG_RUNTIME_DIR") or str(Path.home() / ".cache")
    return Path(base) / "medgemma-edge" / "endpoint.json"


@dataclass(frozen=True)
class Limits:
    """The server's resource guards: what one client may ask of the runtime at once.

    Each is a ``serve`` flag (its ``flag``) and is answered with a typed error (PROTOCOL.md,
    "Limits"); the defaults suit one clinician on one device.
    """

    request_timeout_s: float = setting(
        900.0,
        "wall-clock limit of one request in seconds; past it the request ends with a 'cancelled' "
        "error (0: no limit)",
        flag="--request-timeout",
        minimum=0.0,
        maximum=7 * 86400.0,
    )
    max_request_tokens: int = setting(
        4096,
        "most tokens one generation produces; a larger max_tokens is cut to it (finish_reason length)",
        flag="--max-request-tokens",
        minimum=1,
        maximum=1_000_000,
    )
    max_connections: int = setting(
        32,
        "concurrent connections (HTTP requests, Unix socket clients); more get 'busy'",
        flag="--max-connections",
        minimum=1,
        maximum=4096,
    )
    max_active_requests: int = setting(
        16,
        "requests in flight at once, queued or running; more get 'busy' (health and cancel always answer)",
        flag="--max-requests",
        minimum=1,
        maximum=4096,
    )
    max_images: int = setting(
        16,
        "images (DICOM frames) decoded for one request; more get 'too_large'",
        flag="--max-images",
        minimum=1,
        maximum=1024,
    )
    max_request_pixels: int = setting(
        128_000_000,
        "pixels decoded for one request, all its images together; more get 'too_large'",
        flag="--max-request-pixels",
        minimum=1,
        maximum=10**12,
    )

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class LanSettings:
    """Clinic-server mode (``serve --lan``, android_bridge.lan): TLS, paired devices, the queue.

    Each field is a ``serve`` flag (its ``flag``). The certificate, the paired devices and the
    audit log are kept in ``<data_dir>/lan/``.
    """

    queue: int = setting(
        16,
        "generations that may wait their turn in LAN mode; one more gets 'busy'",
        flag="--lan-queue",
        minimum=1,
        maximum=1024,
    )
    rate: int = setting(
        60,
        "requests per minute one paired device may make (a token bucket); past it 429 'busy'",
        flag="--lan-rate",
        minimum=1,
        maximum=1_000_000,
    )
    pair_ttl_s: float = setting(
        300.0,
        "seconds a pairing code stays valid",
        flag="--lan-pair-ttl",
        minimum=10.0,
        maximum=86400.0,
    )
    pair_attempts: int = setting(
        5,
        "failed pairing attempts allowed per minute; one more burns the open pairing codes",
        flag="--lan-pair-attempts",
        minimum=1,
        maximum=100,
    )
    audit_max_bytes: int = setting(
        8 << 20,
        "size at which the audit log (lan/audit.jsonl) is rotated to audit.jsonl.1",
        flag="--lan-audit-max-bytes",
        minimum=4096,
        maximum=1 << 40,
    )
    cert_days: int = setting(
        730,
        "validity of the self-signed certificate made on first start, in days",
        flag="--lan-cert-days",
        minimum=1,
        maximum=3650,
    )

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class DicomSettings:
    """The DICOM node inside ``serve`` (android_bridge.dicom_node): where it listens and whom
    it accepts. ``port`` None: no node. A ``host`` other than loopback is a LAN bind, logged as
    such at start-up."""

    port: int | None = None
    host: str = "127.0.0.1"
    ae_title: str = "MEDGEMMA"
    allowed_aes: tuple[str, ...] = ()  # calling AE titles accepted (empty: any)
    allowed_peers: tuple[str, ...] = ()  # peer IP addresses accepted (empty: any)


@dataclass
class ServeSettings:
    """Everything ``create_app`` and ``serve`` need; no environment variables are read here.

    ``token`` is a per-launch 256-bit secret (64 hex characters) that every route but ``/``
    requires as ``Authorization: Bearer <token>``.
    """

    bundle: Path | None = None
    medsiglip_bundle: Path | None = None  # default: bundle
    index: Path | None = None
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port chosen by the OS
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    max_body_bytes: int = 64 << 20  # base64 images inflate by 4/3: a 48 MiB DICOM fits
    endpoint_file: Path | None = None
    unix_socket: Path | None = None
    preload: tuple[str, ...] = ("medgemma", "medsiglip")  # loaded in the background at start
    medgemma: MedGemmaSettings | None = None  # None: the defaults
    medsiglip: MedSigLIPSettings | None = None
    image_cache: Any = None  # MedGemma's edge.media.image_cache.ImageCache (None: its own)
    allow_paths: bool = True  # let requests name image files on this device
    grace_s: float = 10.0  # how long shutdown waits for cancelled work to end
    limits: Limits = field(default_factory=Limits)  # the resource guards
    data_dir: Path | None = None  # received studies and reports (None: neither is kept)
    dicom: DicomSettings | None = None  # the DICOM node (None: none)
    index_received: bool = False  # add each received image to the similar-case index
    prepare_received: bool = False  # encode the newest received study for MedGemma while idle
    delivery: Any = None  # android_bridge.delivery.DeliverySettings: where send_report delivers
    lan: LanSettings | None = None  # clinic-server mode (TLS, paired devices, queue); None: loopback

    def __post_init__(self) -> None:
        if len(self.token) < 32:
            raise ValueError("the token must have at least 128 bits (32 hex characters)")
        if self.lan is not None and self.data_dir is None:
            raise ValueError("LAN mode keeps its certificate and paired devices in data_dir: give one")

    @property
    def lan_dir(self) -> Path | None:
        """Where LAN mode keeps its certificate, paired devices and audit log (None: not LAN)."""
        return None if self.lan is None or self.data_dir is None else Path(self.data_dir) / "lan"

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK
