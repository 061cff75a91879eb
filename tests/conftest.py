"""Shared fixtures: tiny twins and bundles built once per test session, in tmp dirs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# OpenMP threads (llama.cpp's) sleep when idle instead of spinning: on a shared 2-core machine a
# spinning pool starved the other work (an eval of the 270M took 46 s instead of 9.5 s). Set
# before llama_cpp is imported; the commands the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session", autouse=True)
def _private_data_dir(tmp_path_factory):
    """Received studies and reports of every test (and of the commands they start) go to a tmp
    dir, never to the user's ~/.local/share/medgemma-edge."""
    old = os.environ.get("MEDGEMMA_EDGE_DATA")
    os.environ["MEDGEMMA_EDGE_DATA"] = str(tmp_path_factory.mktemp("data-dir"))
    yield
    if old is None:
        os.environ.pop("MEDGEMMA_EDGE_DATA", None)
    else:
        os.environ["MEDGEMMA_EDGE_DATA"] = old


@pytest.fixture(scope="session")
def medgemma_twin(tmp_path_factory) -> Path:
    from export.twin import build_twin

    return build_twin("medgemma", size="tiny", out=tmp_path_factory.mktemp("twins") / "medgemma", seed=0).path


@pytest.fixture(scope="session")
def medsiglip_twin(tmp_path_factory) -> Path:
    from export.twin import build_twin

    return build_twin(
        "medsiglip", size="tiny", out=tmp_path_factory.mktemp("twins") / "medsiglip", seed=0
    ).path


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``medgemma-edge ARGS`` in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "medgemma_edge", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )


# Fixtures of each export pipeline live beside their tests; registered here so every test sees them.
pytest_plugins = [
    "fixtures_gguf",
    "fixtures_onnx",
    "fixtures_llm",
    "fixtures_cases",
    "fixtures_bridge",
    "fixtures_dicom",
]


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming ``width`` x ``height``, and almost no pixel data: a
    decompression bomb's header (refused from the header, before any decoding)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
