"""MedGemma → GGUF export on the tiny twin: bundle, fidelity, verify, load."""

import base64
import io
import json
import os

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from edge.bundle.manifest import open_bundle
from edge.errors import IntegrityError, ResourceError, UsageError
from edge.medgemma.stock import load_checked, open_medgemma

TEXT_QUANTS = ["F32", "Q8_0", "Q4_K_M"]
MMPROJ_TYPES = ["f16", "q8_0"]


def test_export_writes_a_complete_component(gguf_bundle):
    b = open_bundle(gguf_bundle)
    comp = b.component("medgemma")
    assert sorted(f["path"] for f in comp["files"]) == sorted(
        [f"medgemma/text-{q}.gguf" for q in TEXT_QUANTS] + [f"medgemma/mmproj-{t}.gguf" for t in MMPROJ_TYPES]
    )
    for f in comp["files"]:
        assert f["role"] in ("text", "mmproj") and len(f["sha256"]) == 64
        assert f["ram_bytes"] > f["bytes"] == (gguf_bundle / f["path"]).stat().st_size
        assert f["gguf"]["architecture"] == ("gemma3" if f["role"] == "text" else "clip")
        assert comp["requirements"][f["path"]] == f["ram_bytes"]
    text = b.file("medgemma", "text", quant="Q8_0")
    assert text["gguf"]["vocab"] == 1088 and text["gguf"]["tensors"] == 80
    assert text["gguf"]["tensor_types"] == {"f32": 37, "q8_0": 43}  # norms stay f32
    assert comp["provenance"] == "exported"
    assert comp["source"]["synthetic"] is True and "seed 0" in comp["source"]["description"]
    assert comp["source"]["layout"] == "released"
    assert comp["licence"]["name"] == "Health AI Developer Foundations Terms of Use"
    assert comp["prompt"]["format"] == "gemma3-chat" and comp["prompt"]["stop"] == ["<end_of_turn>", "<eos>"]
    assert "<start_of_turn>" in comp["prompt"]["chat_template"]
    assert comp["defaults"]["temperature"] == 0.0
    assert [s["step"] for s in comp["export"]["steps"]][:2] == ["convert text f32", "quantize Q8_0"]
    notice = (gguf_bundle / "NOTICE").read_text()
    assert (
        "Health AI Developer Foundations" in notice
        and "quantized with llama.cpp to F32, Q8_0, Q4_K_M" in notice
    )
    leftovers = [p.name for p in gguf_bundle.parent.iterdir() if "staging" in p.name or ".work-" in p.name]
    assert leftovers == []


def test_verify_reports_gguf_headers(gguf_bundle):
    r = run_cli("verify", str(gguf_bundle), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] and report["synthetic"]
    facts = {f["path"]: f["facts"] for f in report["files"]}
    assert facts["medgemma/text-Q4_K_M.gguf"] == {"architecture": "gemma3", "tensors": 80, "vocab": 1088}
    assert facts["medgemma/mmproj-q8_0.gguf"] == {"architecture": "clip", "tensors": 39}


def test_f32_conversion_matches_transformers(gguf_export):
    fid = gguf_export.fidelity
    f32 = fid["text"]["F32"]
    assert f32["positions"] == fid["prompts"]["text_tokens"] > 40
    assert f32["top1"] == 1.0
    assert f32["max_abs"] < 1e-2  # measured ~3e-3: ggml's CPU GELU goes through an f16 table
    assert f32["mean_abs"] < 1e-3 and f32["kl"] < 1e-5
    img = f32["image_prompt"]
    assert img["tokens_match"] and img["top1"] == 1.0 and img["max_abs"] < 1e-2
    assert fid["mmproj"]["f16"]["cosine"] > 0.99999 and fid["mmproj"]["f16"]["cosine_min_token"] > 0.9999


def test_quantizations_are_measured_and_ordered(gguf_export):
    text = gguf_export.fidelity["text"]
    assert list(text) == TEXT_QUANTS
    for q in TEXT_QUANTS:
        assert all(np.isfinite(text[q][k]) for k in ("top1", "max_abs", "mean_abs", "kl")), q
        assert text[q]["image_prompt"]["tokens_match"]
    # fewer bits, further from the reference
    assert text["F32"]["kl"] < text["Q8_0"]["kl"] < text["Q4_K_M"]["kl"]
    assert text["Q8_0"]["top1"] >= 0.9
    mm = gguf_export.fidelity["mmproj"]
    assert 0.999 < mm["q8_0"]["cosine"] <= mm["f16"]["cosine"]


def test_f32_gguf_tensors_equal_the_checkpoint(gguf_bundle, medgemma_twin):
    import gguf
    from safetensors.numpy import load_file

    st = load_file(str(medgemma_twin / "model.safetensors"))
    r = gguf.GGUFReader(str(gguf_bundle / "medgemma" / "text-F32.gguf"))
    got = {t.name: np.asarray(t.data) for t in r.tensors}
    lm = "language_model.model."
    pairs = {
        "token_embd.weight": (st[lm + "embed_tokens.weight"][:1088], 0.0),
        "blk.0.attn_q.weight": (st[lm + "layers.0.self_attn.q_proj.weight"], 0.0),
        "blk.5.ffn_down.weight": (st[lm + "layers.5.mlp.down_proj.weight"], 0.0),
        "blk.3.attn_norm.weight": (st[lm + "layers.3.input_layernorm.weight"], 1.0),  # Gemma norms: 1 + w
        "output_norm.weight": (st[lm + "norm.weight"], 1.0),
    }
    for name, (want, shift) in pairs.items():
        assert got[name].shape == want.shape, name
        np.testing.assert_array_equal(got[name], want + np.float32(shift), err_msg=name)


def _png_data_uri(size: int) -> str:
    from export.gguf.fidelity import test_image

    buf = io.BytesIO()
    Image.fromarray(test_image(size)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("quant", TEXT_QUANTS)
def test_llama_cpp_answers_text_with_every_text_file(gguf_bundle, quant):
    llm = open_medgemma(gguf_bundle, quant=quant, n_ctx=256, threads=2)
    try:
        out = llm.create_completion("The chest x-ray shows", max_tokens=8, temperature=0.0)
    finally:
        llm.close()
    assert out["usage"]["completion_tokens"] > 0 and out["choices"][0]["text"]


@pytest.mark.parametrize("mmproj", MMPROJ_TYPES)
def test_llama_cpp_answers_an_image_question_with_every_mmproj(gguf_bundle, mmproj):
    llm = open_medgemma(gguf_bundle, quant="Q4_K_M", mmproj=mmproj, n_ctx=512, threads=2)
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": _png_data_uri(128)}},
                {"type": "text", "text": "Describe the findings in this image."},
            ],
        }
    ]
    try:
        out = llm.create_chat_completion(messages=msgs, max_tokens=8, temperature=0.0)
    finally:
        llm.close()
    # 16 image tokens + the chat turn went through the model
    assert out["usage"]["prompt_tokens"] > 16 and out["usage"]["completion_tokens"] > 0


def test_tampered_byte_fails_verify_and_load_naming_the_file(gguf_bundle_copy):
    path = gguf_bundle_copy / "medgemma" / "text-Q8_0.gguf"
    assert run_cli("verify", str(gguf_bundle_copy)).returncode == 0
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    r = run_cli("verify", str(gguf_bundle_copy))
    assert r.returncode == 3
    assert "medgemma/text-Q8_0.gguf" in r.stderr and "sha256" in r.stderr
    assert r.stderr.strip().count("\n") == 0
    with pytest.raises(IntegrityError, match="medgemma/text-Q8_0.gguf"):
        load_checked(gguf_bundle_copy)
    with pytest.raises(IntegrityError, match="medgemma/text-Q8_0.gguf"):
        open_medgemma(gguf_bundle_copy, quant="Q8_0")
    # the untouched files still load
    others = {"medgemma/text-Q4_K_M.gguf", "medgemma/mmproj-f16.gguf"}
    assert set(load_checked(gguf_bundle_copy, paths=others)) == others


def test_truncated_gguf_in_bundle_fails_verify(gguf_bundle_copy):
    path = gguf_bundle_copy / "medgemma" / "mmproj-f16.gguf"
    os.truncate(path, path.stat().st_size - 100)
    r = run_cli("verify", str(gguf_bundle_copy), "--json")
    assert r.returncode == 3
    bad = [f for f in json.loads(r.stdout)["files"] if not f["ok"]]
    assert [f["path"] for f in bad] == ["medgemma/mmproj-f16.gguf"] and "truncated" in bad[0]["error"]


def test_stamp_skips_rehash_until_size_or_mtime_change(gguf_bundle_copy):
    b = open_bundle(gguf_bundle_copy)
    b.verify(trust_stamp=False)
    again = b.verify()
    assert again.ok and not any(f.hashed for f in again.files)
    path = gguf_bundle_copy / "medgemma" / "text-Q4_K_M.gguf"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    third = b.verify()
    assert third.ok and {f.path for f in third.files if f.hashed} == {"medgemma/text-Q4_K_M.gguf"}
    loaded = load_checked(gguf_bundle_copy, paths={"medgemma/text-Q8_0.gguf"})
    assert list(loaded) == ["medgemma/text-Q8_0.gguf"]


def test_interrupted_export_leaves_the_previous_bundle(gguf_bundle_copy, medgemma_twin, monkeypatch):
    from export.gguf import convert

    before = (gguf_bundle_copy / "manifest.json").read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "quantize", boom)
    with pytest.raises(KeyboardInterrupt):
        convert.export_medgemma(medgemma_twin, bundle=gguf_bundle_copy, quants="Q8_0", fidelity=False)
    assert (gguf_bundle_copy / "manifest.json").read_bytes() == before
    left = sorted(p.name for p in gguf_bundle_copy.parent.iterdir() if p.name != ".bundle.lock")
    assert left == ["bundle"]  # no scratch or staging directory left
    assert open_bundle(gguf_bundle_copy).verify().ok


def test_not_enough_disk_fails_before_writing(medgemma_twin, tmp_path, monkeypatch):
    from export.gguf import convert

    real = convert.shutil.disk_usage
    monkeypatch.setattr(convert.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(ResourceError, match="not enough disk"):
        convert.export_medgemma(medgemma_twin, bundle=tmp_path / "b", quants="Q8_0", fidelity=False)
    assert list(tmp_path.iterdir()) == []


def test_unknown_quant_is_a_usage_error(medgemma_twin, tmp_path):
    from export.gguf.convert import export_medgemma

    with pytest.raises(UsageError, match="unknown quantization 'Q3_XX'"):
        export_medgemma(medgemma_twin, bundle=tmp_path / "b", quants="Q8_0,Q3_XX")
    r = run_cli("export", "medgemma", str(medgemma_twin), "--bundle", str(tmp_path / "b"), "--mmproj", "q4")
    assert r.returncode == 2 and "unknown mmproj type 'q4'" in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--quant", "F16", "--outtype", "f32"],
            "--quant F16 keeps the text conversion, which is --outtype f32",
        ),
        (["--quant", "BF16"], "--quant BF16 keeps the text conversion, which is --outtype f16"),
        (["--quant", "Q8_0,F32"], "give --outtype f32 to keep F32 text, or --quant F16"),
        (["--quant", " , "], "give at least one quantization"),
        (["--quant", "Q8_0", "--mmproj", "f16,bf16"], "unknown mmproj type 'bf16'"),
        (["--outtype", "q8_0"], "invalid choice: 'q8_0'"),
    ],
)
def test_bad_quant_outtype_mmproj_combinations_are_one_line(medgemma_twin, tmp_path, flags, message):
    """Each is refused before any work: one line, exit 2, no traceback, nothing written."""
    r = run_cli("export", "medgemma", str(medgemma_twin), "--bundle", str(tmp_path / "b"), *flags)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]  # argparse prints its usage above
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert list(tmp_path.iterdir()) == []
