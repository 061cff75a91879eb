"""edge.medsiglip.model on the tiny twin bundle: fidelity vs transformers, zero-shot ranks, batching, cancel."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from edge.bundle.manifest import open_bundle
from edge.device.encoders import FIDELITY_BAR
from edge.errors import Cancelled, InputError, UsageError
from edge.medsiglip.model import NOT_PROBABILITIES, MedSigLIP
from export.onnx import fidelity as fid
from export.onnx.labels import LABEL_SETS

FP32_COSINE = 0.99999  # the export's bound for fp32 on tiny twins


def _reference_embeddings(model, proc, images, texts) -> dict[str, np.ndarray]:
    """transformers' raw embeddings (SiglipModel fp32, its own processor) of images and texts."""
    import torch

    with torch.inference_mode():
        px = proc(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        ids = proc(text=texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
        return {
            "image_embeds": model.get_image_features(pixel_values=px).numpy(),
            "text_embeds": model.get_text_features(input_ids=ids["input_ids"]).numpy(),  # no mask, as SigLIP
        }


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_embeddings_reproduce_the_exports_fidelity(precision, medsiglip_bundle, twin_reference):
    """On the export's own fidelity inputs the runtime gives the figures the manifest recorded."""
    model, proc = twin_reference
    fidelity = open_bundle(medsiglip_bundle).component("medsiglip")["fidelity"]
    images = fid.sample_images(fidelity["images"])
    texts = [p for s in LABEL_SETS.values() for p in s.values()] + fid.EXTRA_TEXTS
    ref = _reference_embeddings(model, proc, images, texts)
    enc = MedSigLIP(medsiglip_bundle, precision=precision, threads=2)
    got_img = enc.embed_images(images)
    got_txt = enc.embed_texts(texts)
    assert got_img.shape == (len(images), enc.dim) and got_img.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got_img, axis=1), 1.0, atol=1e-5)
    for tower, got, ref_emb in (
        ("vision", got_img, ref["image_embeds"]),
        ("text", got_txt, ref["text_embeds"]),
    ):
        cos = np.sum(fid.normalize(ref_emb.astype(np.float64)) * got, axis=1)
        on_openvino = tower == "vision" and enc.engine == "openvino"  # auto on a bf16-class CPU
        recorded = fidelity[precision]["vision_openvino" if on_openvino else tower]["cosine_min"]
        assert cos.min() == pytest.approx(recorded, abs=1e-4 if on_openvino else 2e-5), (
            tower,
            cos.min(),
            recorded,
        )
        if precision == "fp32":
            assert cos.min() >= (FIDELITY_BAR if on_openvino else FP32_COSINE)


def test_the_fp32_vision_tower_runs_on_openvino_within_its_recorded_fidelity(medsiglip_bundle, caplog):
    """The export measures the fp32 vision tower on OpenVINO (bf16 compute where the CPU has it)
    and the runtime, asked for OpenVINO, gives embeddings within that bound of onnxruntime's."""
    ov_fid = open_bundle(medsiglip_bundle).component("medsiglip")["fidelity"]["fp32"]["vision_openvino"]
    assert ov_fid["engine"] == "openvino" and ov_fid["compute"] in ("bf16", "fp32")
    assert ov_fid["cosine_min"] >= FIDELITY_BAR
    images = fid.sample_images(5)
    ort = MedSigLIP(medsiglip_bundle, precision="fp32", engine="onnxruntime", threads=2, towers=("vision",))
    ov = MedSigLIP(medsiglip_bundle, precision="fp32", engine="openvino", threads=2, towers=("vision",))
    assert (ort.engine, ov.engine) == ("onnxruntime", "openvino")
    assert ort.fingerprint == ov.fingerprint  # the same file: the same embedding space
    a, b = ort.embed_images(images), ov.embed_images(images)
    assert np.sum(a * b, axis=1).min() >= FIDELITY_BAR
    np.testing.assert_allclose(ov.embed_images(images, batch_size=1), b, atol=1e-5)  # batches exact


def test_auto_picks_openvino_only_where_measured_and_native(medsiglip_bundle, monkeypatch):
    from edge.device import accel
    from edge.medsiglip.onnx_towers import vision_engine

    monkeypatch.setattr(accel, "cpu_class", lambda flags=None: "bf16")
    assert MedSigLIP(medsiglip_bundle, precision="fp32", towers=("text",)).engine == "openvino"
    assert vision_engine("fp32", "auto", 0.9989) == "onnxruntime"  # recorded below the bar
    assert vision_engine("fp32", "auto", None) == "onnxruntime"  # never measured (no OpenVINO at export)
    assert MedSigLIP(medsiglip_bundle, precision="int8", towers=("text",)).engine == "onnxruntime"
    monkeypatch.setattr(accel, "cpu_class", lambda flags=None: "avx2")  # no native bf16
    assert MedSigLIP(medsiglip_bundle, precision="fp32", towers=("text",)).engine == "onnxruntime"
    with pytest.raises(UsageError, match="OpenVINO runs MedSigLIP's fp32 towers, not int8"):
        MedSigLIP(medsiglip_bundle, precision="int8", engine="openvino")
    with pytest.raises(UsageError, match="engine"):
        MedSigLIP(medsiglip_bundle, precision="fp32", engine="tpu")


def test_without_openvino_the_vision_tower_falls_back_with_one_log_line(
    medsiglip_bundle, monkeypatch, caplog
):
    from edge.device import accel
    from edge.errors import MissingDependency

    real = accel.open_runner

    def no_openvino(path, runtime, **kw):
        if runtime == "openvino":
            raise MissingDependency("openvino is not installed (pip install 'medgemma-edge[openvino]')")
        return real(path, runtime, **kw)

    monkeypatch.setattr(accel, "open_runner", no_openvino)
    images = fid.sample_images(3)
    with caplog.at_level("WARNING", logger="edge.medsiglip.onnx_towers"):
        enc = MedSigLIP(medsiglip_bundle, precision="fp32", engine="openvino", threads=2, towers=("vision",))
    assert enc.engine == "onnxruntime"
    lines = [r.getMessage() for r in caplog.records if r.name == "edge.medsiglip.onnx_towers"]
    assert len(lines) == 1 and "running it on onnxruntime" in lines[0] and "not installed" in lines[0]
    ort = MedSigLIP(medsiglip_bundle, precision="fp32", engine="onnxruntime", threads=2, towers=("vision",))
    np.testing.assert_array_equal(enc.embed_images(images), ort.embed_images(images))


def test_batching_fp32_is_exact_and_int8_defaults_to_batch_one(fp32_encoder, int8_encoder):
    images = fid.sample_images(5)
    one = fp32_encoder.embed_images(images, batch_size=1)
    many = fp32_encoder.embed_images(images, batch_size=4)
    np.testing.assert_allclose(one, many, atol=1e-5)
    assert int8_encoder.default_batch() == 1
    a = int8_encoder.embed_images(images)
    b = int8_encoder.embed_images(images[2:3])
    np.testing.assert_array_equal(a[2:3], b)  # an image's int8 embedding doesn't depend on its neighbours


def test_inputs_paths_bytes_and_dicom(int8_encoder, cases_samples):
    png = sorted((cases_samples / "film").glob("*.png"))[0]
    dcm = cases_samples / "dicom" / "CT_small.dcm"
    e = int8_encoder.embed_images([png, png.read_bytes(), Image.open(png), dcm])
    np.testing.assert_array_equal(e[0], e[1])
    np.testing.assert_allclose(e[0], e[2], atol=1e-6)
    assert not np.allclose(e[0], e[3], atol=1e-3)
    with pytest.raises(InputError, match="not an image"):
        int8_encoder.embed_images([b"\x89PNG\r\n\x1a\n" + bytes(20)])


def test_cancel_between_batches(fp32_encoder):
    cancel = threading.Event()
    seen = []

    def progress(done, total):
        seen.append(done)
        cancel.set()  # a user presses stop while the first batch runs

    with pytest.raises(Cancelled):
        fp32_encoder.embed_images(fid.sample_images(6), batch_size=2, cancel=cancel, progress=progress)
    assert seen == [2]  # exactly one batch ran
    with pytest.raises(Cancelled):
        fp32_encoder.embed_texts(["a", "b"], cancel=cancel)


def test_text_session_is_lazy_and_towers_restrict(medsiglip_bundle):
    enc = MedSigLIP(medsiglip_bundle, precision="int8", threads=1)
    assert enc.open_towers == {"vision"}
    enc.embed_texts(["a chest x-ray"])
    assert enc.open_towers == {"vision", "text"}
    vision_only = MedSigLIP(medsiglip_bundle, precision="int8", towers=("vision",))
    with pytest.raises(UsageError, match="without its text tower"):
        vision_only.embed_texts(["x"])
    assert vision_only.classify(
        fid.sample_images(1)[0], label_set="cxr"
    ).ranked  # stored labels: no text tower
    assert vision_only.open_towers == {"vision"}
    with pytest.raises(InputError, match="no fp64"):
        MedSigLIP(medsiglip_bundle, precision="fp64")
    with pytest.raises(UsageError):
        MedSigLIP(medsiglip_bundle, towers=("audio",))


def _reference_logits(model, proc, image, prompts) -> np.ndarray:
    import torch

    with torch.inference_mode():
        inputs = proc(
            text=prompts,
            images=[image.convert("RGB")],
            padding="max_length",
            max_length=64,
            return_tensors="pt",
        )
        # SigLIP runs its text tower without an attention mask (pooled at the last position, pads
        # included); this processor returns one, and SiglipModel would honour it: drop it.
        inputs.pop("attention_mask", None)
        return model(**inputs).logits_per_image[0].numpy()


@pytest.mark.parametrize("how", ["label_set", "labels"])
def test_classify_ranks_match_transformers(how, fp32_encoder, twin_reference):
    model, proc = twin_reference
    for image in fid.sample_images(3):
        if how == "label_set":
            res = fp32_encoder.classify(image, label_set="cxr")
            prompts = list(LABEL_SETS["cxr"].values())
            names = list(LABEL_SETS["cxr"])
            assert res.embeddings == "bundled label embeddings"
        else:
            names = prompts = ["pleural effusion", "a normal chest", "a skin rash", "fracture of the rib"]
            res = fp32_encoder.classify(image, labels=prompts)
            assert res.embeddings.startswith("text tower")
        ref = _reference_logits(model, proc, image, prompts)
        order = np.argsort(-ref, kind="stable")
        assert np.min(np.abs(np.diff(ref[order]))) > 1e-3  # no near-ties: the ranking is meaningful
        assert [r.label for r in res.ranked] == [names[i] for i in order]
        got = {r.label: r.logit for r in res.ranked}
        np.testing.assert_allclose([got[n] for n in names], ref, atol=1e-3 * max(1.0, np.abs(ref).max()))
        assert all(r.score == pytest.approx(1 / (1 + np.exp(-r.logit))) for r in res.ranked)
        assert res.note == NOT_PROBABILITIES


def test_classify_errors(int8_encoder):
    img = fid.sample_images(1)[0]
    with pytest.raises(UsageError, match="not both"):
        int8_encoder.classify(img, labels=["a"], label_set="cxr")
    with pytest.raises(InputError, match="unknown label set 'eye'.*cxr, derm"):
        int8_encoder.classify(img, label_set="eye")
    with pytest.raises(UsageError, match="at least one label"):
        int8_encoder.classify(img, labels=[" ", ""])
    default = int8_encoder.classify(img)
    assert default.label_set == "cxr" and len(default.ranked) == len(LABEL_SETS["cxr"])
    assert [r.score for r in default.ranked] == sorted((r.score for r in default.ranked), reverse=True)


def test_a_manifest_that_does_not_state_the_openvino_cosine_as_a_number_means_not_measured():
    from edge.medsiglip.onnx_towers import recorded_openvino_cosine

    for comp in (
        {},
        {"fidelity": []},
        {"fidelity": {"fp32": "x"}},
        {"fidelity": {"fp32": {"vision_openvino": 1}}},
    ):
        assert recorded_openvino_cosine(comp, "fp32") is None
    for bad in ("0.9999", True, None, [0.9999]):
        assert (
            recorded_openvino_cosine({"fidelity": {"fp32": {"vision_openvino": {"cosine_min": bad}}}}, "fp32")
            is None
        )
    assert (
        recorded_openvino_cosine({"fidelity": {"fp32": {"vision_openvino": {"cosine_min": 0.9999}}}}, "fp32")
        == 0.9999
    )
