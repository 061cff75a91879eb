"""The default calibration text (invented clinical-style text, no patient data) shipped with the
exporter: one part for the importance matrix, a held-out part for the KL report. See README.md."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

CALIBRATION = "calibration.txt"
HELDOUT = "heldout.txt"
MCQ_EXAMPLE = "mcq-invented.jsonl"
ORIGIN = "medgemma-edge default calibration text (invented clinical-style text, no patient data)"


def path(name: str) -> Path:
    """The shipped file ``name`` on disk (the package is installed as files, never zipped)."""
    p = Path(str(resources.files(__name__).joinpath(name)))
    if not p.is_file():
        raise FileNotFoundError(f"the package's {name} is missing: reinstall medgemma-edge")
    return p


def describe(p: Path, *, origin: str, role: str) -> dict:
    """What the manifest records about a text file: origin, role, bytes, sha256 (no content)."""
    data = Path(p).read_bytes()
    return {"origin": origin, "role": role, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
