"""Fixtures for the MedSigLIP runtime and the similar-case index (on the tiny twin bundle)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def cases_samples(tmp_path_factory) -> Path:
    """A folder of varied small images: film-like PNG, skin-like JPEG, fundus-like, 16-bit, DICOM."""
    import pydicom

    from medgemma_edge.demo.cases import KINDS

    root = tmp_path_factory.mktemp("cases-samples")
    rng = np.random.default_rng(7)
    for kind, (make, ext) in KINDS.items():
        (root / kind).mkdir()
        for i in range(4):
            img = make(rng)
            img.save(root / kind / f"{kind}-{i}.{ext}", **({"quality": 90} if ext == "jpg" else {}))
    src = Path(pydicom.__file__).parent / "data" / "test_files"  # offline, inside the package
    (root / "dicom").mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copyfile(src / name, root / "dicom" / name)
    return root


@pytest.fixture(scope="session")
def int8_encoder(medsiglip_bundle):
    from edge.medsiglip.model import MedSigLIP

    return MedSigLIP(medsiglip_bundle, precision="int8", threads=2)


@pytest.fixture(scope="session")
def fp32_encoder(medsiglip_bundle):
    from edge.medsiglip.model import MedSigLIP

    # onnxruntime: the exact fp32 path (OpenVINO's bf16 compute, auto on bf16-class CPUs, has tests of its own)
    return MedSigLIP(medsiglip_bundle, precision="fp32", threads=2, engine="onnxruntime")


@pytest.fixture(scope="session")
def twin_reference(medsiglip_twin):
    """transformers' SiglipModel and processor of the tiny twin (the reference implementation)."""
    import transformers

    model = transformers.SiglipModel.from_pretrained(medsiglip_twin).eval()
    proc = transformers.SiglipProcessor.from_pretrained(medsiglip_twin, use_fast=False)
    return model, proc


@pytest.fixture
def fresh_index(tmp_path, int8_encoder):
    """An empty index bound to the int8 encoder."""
    from edge.cases.index import CaseIndex

    with CaseIndex.open(tmp_path / "index", encoder=int8_encoder, create=True) as idx:
        yield idx
