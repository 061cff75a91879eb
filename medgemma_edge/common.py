"""What every verb shares: the bundle to use, and the one JSON object ``--json`` prints."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from edge.errors import UsageError


def default_bundle() -> str | None:
    return os.environ.get("MEDGEMMA_EDGE_BUNDLE")


def resolve_bundle(path: str | os.PathLike | None) -> Path:
    """The bundle to use: the argument, else $MEDGEMMA_EDGE_BUNDLE."""
    chosen = path or default_bundle()
    if not chosen:
        raise UsageError(
            "no bundle given: pass -b BUNDLE or set MEDGEMMA_EDGE_BUNDLE (make demo builds models/bundles/demo)"
        )
    return Path(chosen)


def check_range(flag: str, value: int | None, minimum: int, maximum: int | None = None) -> None:
    """Refuse a number flag out of ``[minimum, maximum]`` (None: not given, fine) with a UsageError."""
    if value is None:
        return
    if value < minimum or (maximum is not None and value > maximum):
        within = f"at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise UsageError(f"{flag} must be {within} (got {value})")


def emit_json(obj: dict) -> None:
    """The one JSON object a ``--json`` command prints on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def port_arg(text: str) -> int:
    """A TCP port for argparse: 0 (a free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0 to 65535; 0 picks a free one)")
    return port
