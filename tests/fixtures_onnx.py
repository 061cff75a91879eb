"""Fixtures for the ONNX export (tiny MedSigLIP twin bundle), built once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def medsiglip_export(medsiglip_twin, tmp_path_factory):
    """The tiny twin exported at every precision (inline weights): an ExportResult."""
    from export.onnx.medsiglip import export_medsiglip

    root = tmp_path_factory.mktemp("onnx") / "bundle"
    return export_medsiglip(medsiglip_twin, bundle=root, precisions="fp32,int8,fp16")


@pytest.fixture(scope="session")
def medsiglip_bundle(medsiglip_export) -> Path:
    return medsiglip_export.bundle


@pytest.fixture(scope="session")
def medsiglip_ext_bundle(medsiglip_twin, tmp_path_factory) -> Path:
    """The tiny twin exported fp32 + int8 with weights forced into external .onnx.data files."""
    from export.onnx.medsiglip import export_medsiglip

    root = tmp_path_factory.mktemp("onnx-ext") / "bundle"
    export_medsiglip(
        medsiglip_twin, bundle=root, precisions="fp32,int8", external_data=True, fidelity_images=2
    )
    return root


@pytest.fixture
def ext_bundle_copy(medsiglip_ext_bundle, tmp_path) -> Path:
    """A private copy of the external-data bundle, for tests that damage it."""
    dst = tmp_path / "bundle"
    shutil.copytree(medsiglip_ext_bundle, dst)
    (dst / ".verified.json").unlink(missing_ok=True)
    return dst
