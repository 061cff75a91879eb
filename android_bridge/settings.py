"""The loopback server's settings: one dataclass behind the CLI flags and the tests' app factory."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.medgemma.settings import MedGemmaSettings
from edge.medsiglip.settings import MedSigLIPSettings

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def default_endpoint_file() -> Path:
    """Where ``serve`` writes its endpoint (host, port, pid, token): a per-user, 0700 directory."""
    base = os.environ.get("XDG_RUNTIME_DIR") or str(Path.home() / ".cache")
    return Path(base) / "medgemma-edge" / "endpoint.json"


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

    def __post_init__(self) -> None:
        if len(self.token) < 32:
            raise ValueError("the token must have at least 128 bits (32 hex characters)")

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK
