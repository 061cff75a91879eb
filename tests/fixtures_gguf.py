"""Fixtures for the GGUF export: the tiny MedGemma twin exported once per session."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def gguf_export(tmp_path_factory, medgemma_twin):
    """The tiny twin exported (f32 conversion kept, Q8_0, Q4_K_M, mmproj f16 + q8_0, fidelity)."""
    from export.gguf.convert import export_medgemma

    root = tmp_path_factory.mktemp("gguf") / "bundle"
    return export_medgemma(
        medgemma_twin, bundle=root, quants="F32,Q8_0,Q4_K_M", mmproj="f16,q8_0", outtype="f32", threads=2
    )


@pytest.fixture(scope="session")
def gguf_bundle(gguf_export) -> Path:
    """Path of the session's exported bundle (read-only: copy it before changing anything)."""
    return gguf_export.bundle


@pytest.fixture
def gguf_bundle_copy(gguf_bundle, tmp_path) -> Path:
    """A private copy of the exported bundle that a test may damage."""
    dst = tmp_path / "bundle"
    shutil.copytree(gguf_bundle, dst)
    return dst


@pytest.fixture
def twin_copy(medgemma_twin, tmp_path) -> Path:
    """A private copy of the tiny MedGemma twin checkpoint that a test may edit."""
    dst = tmp_path / "ckpt"
    shutil.copytree(medgemma_twin, dst)
    return dst


def edit_config(ckpt: Path, edit) -> None:
    """Apply ``edit(config)`` to ``ckpt/config.json``."""
    path = ckpt / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg, indent=2))
