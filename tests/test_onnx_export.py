"""MedSigLIP → ONNX export on the tiny twin: bundle, device-side run, fidelity, damage, refusal."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, run_cli
from PIL import Image
from safetensors.numpy import load_file

from edge.bundle.manifest import open_bundle
from edge.errors import InputError, IntegrityError, UsageError
from edge.medsiglip import onnx_towers
from export.onnx import fidelity as fid
from export.onnx.labels import LABEL_SETS
from export.onnx.medsiglip import export_medsiglip

FP32_COSINE = 0.99999


def test_component_manifest(medsiglip_bundle, medsiglip_twin):
    b = open_bundle(medsiglip_bundle)
    comp = b.component("medsiglip")
    roles = {(f["role"], f.get("precision")) for f in comp["files"]}
    for prec in ("fp32", "int8", "fp16"):
        assert {("vision", prec), ("text", prec)} <= roles
    assert {"tokenizer", "preprocess", "label-embeddings"} <= {r for r, _ in roles}
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in comp["files"])
    graph = b.file("medsiglip", "vision", precision="int8")
    assert graph["onnx"]["inputs"] == ["pixel_values"] and graph["onnx"]["opset"] >= 17
    assert graph["onnx"]["shapes"]["pixel_values"]["shape"] == ["batch", 3, 448, 448]
    assert b.file("medsiglip", "text", precision="fp32")["onnx"]["shapes"]["input_ids"]["shape"] == [
        "batch",
        64,
    ]
    cfg = json.loads((medsiglip_twin / "config.json").read_text())
    assert comp["embedding_dim"] == cfg["text_config"]["projection_size"]
    w = load_file(medsiglip_twin / "model.safetensors")
    assert comp["logit_scale"] == pytest.approx(float(w["logit_scale"].reshape(-1)[0]))
    assert comp["logit_bias"] == pytest.approx(float(w["logit_bias"].reshape(-1)[0]))
    assert comp["source"]["synthetic"] and comp["source"]["twin"]["seed"] == 0
    assert comp["licence"]["name"] == "Health AI Developer Foundations Terms of Use"
    assert "Health AI Developer Foundations" in (medsiglip_bundle / "NOTICE").read_text()
    assert comp["label_sets"]["cxr"]["labels"] == list(LABEL_SETS["cxr"])
    assert len(comp["label_sets"]["derm"]["prompts"]) == len(LABEL_SETS["derm"])
    report = b.verify(trust_stamp=False)
    assert report.ok, report.to_json()
    facts = {f.path: f.facts for f in report.files}
    assert facts["medsiglip/text-int8.onnx"]["outputs"] == "text_embeds,text_embeds_normalized"


def test_fidelity_recorded_and_within_bounds(medsiglip_bundle):
    fidelity = open_bundle(medsiglip_bundle).component("medsiglip")["fidelity"]
    for tower in ("vision", "text"):
        assert fidelity["fp32"][tower]["cosine_min"] >= FP32_COSINE
    for prec in ("fp32", "int8", "fp16"):
        for tower in ("vision", "text"):
            f = fidelity[prec][tower]
            assert 0 < f["cosine_min"] <= f["cosine_mean"] <= 1 + 1e-9 and f["max_abs_diff"] >= 0
        assert set(fidelity[prec]["zero_shot"]) == {"cxr", "derm"}
    assert all(z["top1_agreement"] == 1.0 for z in fidelity["fp32"]["zero_shot"].values())
    # lower precisions do lose something: the figures are measured, not copied
    assert fidelity["int8"]["vision"]["max_abs_diff"] > fidelity["fp32"]["vision"]["max_abs_diff"]


DEVICE_RUN = """
import json, sys
import numpy as np
from PIL import Image
from edge.medsiglip import onnx_towers
from edge.medsiglip.preprocess import images_to_batch
bundle, inputs, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
spec, tok = onnx_towers.load_preprocessing(bundle)
px = images_to_batch([Image.open(p) for p in inputs["images"]], spec)
ids = tok.batch(inputs["texts"])
res = {}
for prec in ("fp32", "int8", "fp16"):
    v = onnx_towers.load_session(bundle, "vision", prec, threads=1)
    t = onnx_towers.load_session(bundle, "text", prec, threads=1)
    res[f"{prec}_img"] = v.run(None, {"pixel_values": px})[0]
    res[f"{prec}_img1"] = np.concatenate([v.run(None, {"pixel_values": px[i:i + 1]})[0] for i in range(len(px))])
    res[f"{prec}_txt"] = t.run(None, {"input_ids": ids})[0]
    res[f"{prec}_txtn"] = t.run(None, {"input_ids": ids[:1]})[1]
np.savez(out, **res)
print(json.dumps(sorted(m for m in ("torch", "transformers", "onnx", "optimum", "export") if m in sys.modules)))
"""


def test_device_process_without_torch_matches_transformers(medsiglip_bundle, medsiglip_twin, tmp_path):
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, (50 + 40 * i, 70, 3), dtype=np.uint8)) for i in range(2)]
    images.append(fid.sample_images(1)[0])  # grayscale
    paths = []
    for i, im in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        im.save(paths[-1])
    texts = fid.EXTRA_TEXTS + ["a chest x-ray showing pneumothorax"]
    out = tmp_path / "device.npz"
    inputs = json.dumps({"images": paths, "texts": texts})
    r = subprocess.run(
        [sys.executable, "-c", DEVICE_RUN, str(medsiglip_bundle), inputs, str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []  # no torch, transformers, onnx, export
    got = np.load(out)

    import transformers

    model = transformers.SiglipModel.from_pretrained(medsiglip_twin).eval()
    proc = transformers.SiglipProcessor.from_pretrained(medsiglip_twin, use_fast=False)
    ref = fid.reference_embeddings(
        proc, vision=model.vision_model, text=model.text_model, images=images, texts=texts
    )
    fidelity = open_bundle(medsiglip_bundle).component("medsiglip")["fidelity"]
    for prec in ("fp32", "int8", "fp16"):
        img = fid.compare(ref["image_embeds"], got[f"{prec}_img"])
        txt = fid.compare(ref["text_embeds"], got[f"{prec}_txt"])
        if prec == "fp32":
            assert img["cosine_min"] >= FP32_COSINE and txt["cosine_min"] >= FP32_COSINE
        else:  # the same order of agreement as the manifest measured on its own inputs
            for tower, f in (("vision", img), ("text", txt)):
                assert f["cosine_min"] >= 1 - 10 * (1 - fidelity[prec][tower]["cosine_min"]) - 1e-6, (
                    prec,
                    tower,
                )
        # dynamic batch: 3 at once equals 1 at a time (dynamic int8 quantizes activations with one
        # scale per batch, so its rows shift with their batch mates: close, not equal)
        batched = fid.compare(got[f"{prec}_img1"], got[f"{prec}_img"])
        if prec == "int8":
            assert batched["cosine_min"] >= 0.99, batched
        else:
            assert batched["max_abs_diff"] < 1e-4, (prec, batched)
        assert np.allclose(np.linalg.norm(got[f"{prec}_txtn"], axis=1), 1, atol=1e-5)


def test_external_data_bundle_verifies_and_runs(medsiglip_ext_bundle):
    b = open_bundle(medsiglip_ext_bundle)
    data = [f for f in b.component("medsiglip")["files"] if f["role"].endswith("-data")]
    assert {(f["role"], f["precision"]) for f in data} == {
        ("vision-data", "fp32"),
        ("text-data", "fp32"),
        ("vision-data", "int8"),
        ("text-data", "int8"),
    }
    rep = b.verify(trust_stamp=False)
    assert rep.ok
    facts = {f.path: f.facts for f in rep.files}
    assert facts["medsiglip/vision-fp32.onnx"]["external"] == "vision-fp32.onnx.data"
    sess = onnx_towers.load_session(b, "vision", "fp32", threads=1)
    out = sess.run(None, {"pixel_values": np.zeros((1, 3, 448, 448), np.float32)})
    assert out[0].shape == (1, b.component("medsiglip")["embedding_dim"])


def _damage(path, how):
    if how == "tampered":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["tampered", "truncated", "missing"])
@pytest.mark.parametrize("name", ["vision-fp32.onnx.data", "vision-int8.onnx"])
def test_damaged_files_fail_verify_and_load(ext_bundle_copy, name, how):
    path = ext_bundle_copy / "medsiglip" / name
    _damage(path, how)
    rep = open_bundle(ext_bundle_copy).verify()
    bad = {f.path: f.error for f in rep.files if not f.ok}
    assert f"medsiglip/{name}" in bad
    if name.endswith(".data") and how != "tampered":  # the graph's header check names its data file too
        assert name in bad[f"medsiglip/{name.removesuffix('.data')}"]
    prec = name.split("-")[1].split(".")[0]
    with pytest.raises(IntegrityError, match=name.replace(".", r"\.")):
        onnx_towers.load_session(ext_bundle_copy, "vision", prec)
    # the other tower is untouched and still loads
    assert onnx_towers.load_session(ext_bundle_copy, "text", prec) is not None


def test_non_siglip_checkpoint_fails_before_writing(tmp_path):
    from export.twin import gemma3_config

    src = tmp_path / "gemma"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**gemma3_config("tiny"), "model_type": "gemma3"}))
    r = run_cli("export", "medsiglip", str(src), "--bundle", str(tmp_path / "B"))
    assert r.returncode == 3, r.stderr
    assert (
        r.stderr.strip().count("\n") == 0 and "'gemma3' checkpoint" in r.stderr and "not SigLIP" in r.stderr
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma"]


@pytest.mark.parametrize(
    ("drop", "message"), [("model.safetensors", "no weights"), ("spiece.model", "no tokenizer")]
)
def test_incomplete_checkpoint_fails_before_writing(medsiglip_twin, tmp_path, drop, message):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(medsiglip_twin, src)
    (src / drop).unlink()
    with pytest.raises(InputError, match=message):
        export_medsiglip(src, bundle=tmp_path / "B")
    assert not (tmp_path / "B").exists()


def test_bad_precision_is_a_usage_error(medsiglip_twin, tmp_path):
    with pytest.raises(UsageError, match="unknown precision 'int4'"):
        export_medsiglip(medsiglip_twin, bundle=tmp_path / "B", precisions="int8,int4")
    assert not (tmp_path / "B").exists()


def test_cli_json_export_keeps_other_component(medsiglip_twin, tmp_path):
    from edge.bundle.write import BundleWriter

    root = tmp_path / "B"
    with BundleWriter(root, "medgemma") as w:
        w.path("medgemma/x.bin").write_bytes(b"gguf stand-in")
        w.add_file("medgemma/x.bin", role="test")
    r = run_cli(
        "export", "medsiglip", str(medsiglip_twin), "--bundle", str(root), "--precision", "fp32", "--json"
    )
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert obj["ok"] and obj["precisions"] == ["fp32"]
    assert obj["fidelity"]["fp32"]["vision"]["cosine_min"] >= FP32_COSINE
    b = open_bundle(root)
    assert set(b.components) == {"medgemma", "medsiglip"} and b.verify().ok
