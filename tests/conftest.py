"""Shared fixtures: tiny twins and bundles built once per test session, in tmp dirs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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
        [sys.executable, "-m", "edge", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )


# Fixtures of each export pipeline live beside their tests; registered here so every test sees them.
pytest_plugins = ["fixtures_gguf", "fixtures_onnx", "fixtures_llm", "fixtures_cases", "fixtures_bridge"]
