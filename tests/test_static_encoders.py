"""Static int8 / bf16 image encoders (issue #20): every engine, the choice, the fallbacks.

On the tiny MedGemma twin: each engine's embeddings give the same greedy answer as the mmproj
path with a cosine within the bound its export recorded; a missing runtime (OpenVINO made
unimportable), a missing file or a missing accelerator falls back with one log line and the
same answer; static int8 batches equal batch 1; the device calibration records a choice that
the next encoder runs. MedSigLIP: the fused, static int8 towers batch exactly.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from edge.bundle.manifest import open_bundle
from edge.device import accel, encoders
from edge.medgemma import loading
from edge.medgemma.model import GenerateOptions, MedGemma
from edge.medgemma.vision import OnnxImageEncoder, calibrate
from edge.media.images import load_image

ALL_ENGINES = ("ort-fp32", "ort-int8", "ort-int8-static", "ov-fp32", "ov-bf16", "ov-int8")
FALLBACK = "falling back to"


@pytest.fixture(scope="session")
def engines_bundle(tmp_path_factory, twin_llm_bundle, medgemma_twin):
    """The twin bundle with the image encoder at every precision (generated calibration images)."""
    from export.onnx.medgemma_vision import export_vision_onnx

    out = tmp_path_factory.mktemp("engines") / "b"
    shutil.copytree(twin_llm_bundle, out)
    export_vision_onnx(medgemma_twin, bundle=out, precisions="fp32,int8,int8-static,openvino-int8")
    return out


@pytest.fixture(autouse=True)
def _own_state(tmp_path, monkeypatch):
    """Each test its own device state (no calibration recorded unless the test records one)."""
    monkeypatch.setenv("MEDGEMMA_EDGE_DATA", str(tmp_path / "data"))


def _image(seed: int = 3):
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(128, 128, 3) * 255).astype("uint8")).save(buf, "PNG")
    return load_image(buf.getvalue())


def _encoder(bundle, engine: str = "auto", **kw) -> OnnxImageEncoder:
    b = open_bundle(bundle)
    entry = b.file("medgemma", "vision-onnx", precision="int8")  # what the loader hands over
    return OnnxImageEncoder(b.path(entry), entry, threads=1, engine=engine, **kw)


def _answer(bundle, encoder, image) -> tuple[np.ndarray, list[int]]:
    """The image's embeddings and the greedy continuation, with ``encoder`` (None: the mmproj)."""
    with MedGemma(bundle, n_ctx=256, image_encoder="mmproj" if encoder is None else "onnx") as m:
        if encoder is not None:
            m.encoder.close()
            m.encoder = encoder
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
        pieces = list(m.stream(msgs, images=[image], options=GenerateOptions(max_tokens=6, stop=[])))
        (embd,) = m.image_cache.values()
        n_prompt = pieces[-1].usage["prompt_tokens"]
        return embd, m.evaluated_tokens()[n_prompt:]


def _cos(a, b) -> float:
    return float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())


def test_export_records_every_engine_with_its_fidelity(engines_bundle):
    b = open_bundle(engines_bundle)
    files = b.files("medgemma")
    by_prec = {f["precision"]: f for f in files if f["role"] in ("vision-onnx", "vision-openvino")}
    assert set(by_prec) == {"fp32", "int8", "int8-static", "openvino-int8"}
    assert by_prec["int8-static"]["calibration"] == {"kind": "generated", "images": 4, "seed": 0}
    assert isinstance(by_prec["int8-static"]["quantization"]["per_channel"], bool)
    ov_bin = next(f for f in files if f.get("data_of") == "medgemma/vision-openvino-int8.xml")
    assert ov_bin["role"] == "vision-openvino-data"
    for name in ALL_ENGINES:
        if name != "ov-fp32":  # OpenVINO fp32 is fp32: not measured separately
            assert encoders.fidelity_of(files, name) > 0.98, name
    assert b.verify().ok


@pytest.mark.parametrize("engine", ALL_ENGINES)
def test_each_engine_answers_like_the_mmproj_path(engines_bundle, engine):
    image = _image()
    ref, ids_ref = _answer(engines_bundle, None, image)
    enc = _encoder(engines_bundle, engine)
    embd, ids = _answer(engines_bundle, enc, image)
    assert enc.engine == engine
    files = open_bundle(engines_bundle).files("medgemma")
    bound = encoders.fidelity_of(files, engine) or encoders.fidelity_of(files, "ort-fp32")
    assert _cos(ref, embd) >= bound - 0.01, (engine, _cos(ref, embd), bound)
    assert ids == ids_ref


def test_without_openvino_falls_back_with_one_line(engines_bundle, monkeypatch, caplog):
    ort_static = _encoder(engines_bundle, "ort-int8-static").encode_pixels(_pixels())
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    caplog.set_level(logging.INFO)
    enc = _encoder(engines_bundle, "ov-int8")
    got = enc.encode_pixels(_pixels())
    lines = [r.getMessage() for r in caplog.records if FALLBACK in r.getMessage()]
    assert len(lines) == 1 and "ov-int8" in lines[0], lines
    assert enc.engine.startswith("ort-")
    if enc.engine == "ort-int8-static":
        assert np.array_equal(got, ort_static)


def test_calibrated_openvino_choice_without_openvino_runs_onnxruntime(engines_bundle, monkeypatch, caplog):
    """A device calibrated with OpenVINO installed, then run without it (or a bundle copied to a
    device without it): the same answer through onnxruntime, one log line."""
    encoders.record(open_bundle(engines_bundle).fingerprint("medgemma"), "ov-int8", {})
    monkeypatch.setitem(sys.modules, "openvino", None)
    caplog.set_level(logging.INFO)
    image = _image()
    _, ids_ref = _answer(engines_bundle, None, image)
    enc = _encoder(engines_bundle)
    assert enc.candidates()[0][0].name == "ov-int8"
    _, ids = _answer(engines_bundle, enc, image)
    assert ids == ids_ref and enc.engine.startswith("ort-")
    assert len([r for r in caplog.records if FALLBACK in r.getMessage()]) == 1


def test_bundle_without_the_optional_file_falls_back(vision_bundle, caplog):
    caplog.set_level(logging.INFO)
    enc = _encoder(vision_bundle, "ort-int8-static")  # vision_bundle has fp32 and dynamic int8 only
    enc.encode_pixels(_pixels())
    lines = [r.getMessage() for r in caplog.records if "does not have" in r.getMessage()]
    assert len(lines) == 1 and enc.engine != "ort-int8-static"


@pytest.mark.parametrize("engine", ["ort-int8-static", "ov-int8"])
def test_missing_accelerator_falls_back_to_the_cpu(engines_bundle, engine, caplog):
    cpu = _encoder(engines_bundle, engine).encode_pixels(_pixels())
    caplog.set_level(logging.INFO)
    enc = _encoder(engines_bundle, engine, gpu=True)  # no CUDA provider / no OpenVINO GPU or NPU here
    got = enc.encode_pixels(_pixels())
    assert enc.engine == engine and enc.runner.device in ("CPU", "CPUExecutionProvider")
    assert [r for r in caplog.records if "running on the CPU" in r.getMessage()]
    assert np.allclose(got, cpu, atol=1e-5)


def test_large_openvino_graphs_compile_once_into_a_bounded_cache(engines_bundle, tmp_path, monkeypatch):
    """OpenVINO's compiled blob is cached for large graphs (the tiny twin's counts as large here)
    and reused by the next open with the same outputs; at most OV_CACHE_KEEP blobs are kept."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(accel, "OV_CACHE_MIN_BYTES", 0)
    cache = tmp_path / "cache" / "medgemma-edge" / "openvino"
    cache.mkdir(parents=True)
    for i in range(accel.OV_CACHE_KEEP + 2):  # older blobs of other graphs
        old = cache / f"old{i}.blob"
        old.write_bytes(b"x")
        os.utime(old, (1_000_000 + i, 1_000_000 + i))
    path = open_bundle(engines_bundle).path(
        open_bundle(engines_bundle).file("medgemma", "vision-onnx", precision="fp32")
    )
    first = accel.open_runner(path, "openvino", threads=1, hint="f32").run({"pixel_values": _pixels()})[0]
    blobs = sorted(p.name for p in cache.glob("*.blob"))
    assert len(blobs) == accel.OV_CACHE_KEEP and any(not b.startswith("old") for b in blobs)
    assert (
        "old0.blob" not in blobs and "old1.blob" not in blobs and "old2.blob" not in blobs
    )  # oldest removed
    again = accel.open_runner(path, "openvino", threads=1, hint="f32").run({"pixel_values": _pixels()})[0]
    np.testing.assert_array_equal(first, again)
    monkeypatch.setenv(accel.OV_CACHE_ENV, "0")
    assert not accel._ov_cacheable(path, "CPU")
    monkeypatch.setattr(accel, "OV_CACHE_MIN_BYTES", 64 << 20)
    monkeypatch.delenv(accel.OV_CACHE_ENV)
    assert not accel._ov_cacheable(path, "CPU") and accel._ov_cacheable(
        path, "GPU.0"
    )  # small: compiled each time


@pytest.mark.parametrize("engine", ["ov-bf16", "ort-int8"])
def test_the_memory_estimate_counts_the_file_and_runtime_the_plan_runs(engines_bundle, engine):
    """The estimate's image-encoder term is that of the engine the plan puts first (the fp32 file
    held twice over by OpenVINO for ov-bf16), not of the int8 file the loader started from."""
    from edge.device import resources

    b = open_bundle(engines_bundle)
    with MedGemma(b, n_ctx=256, image_encoder="onnx", image_engine=engine) as m:
        entry, runtime = m.encoder.entry, m.encoder.plan[0][0].runtime
        assert m.encoder.plan[0][0].name == engine
        want = resources.encoder_bytes(
            b.path(entry), patches=loading.image_patches(b.component("medgemma"), entry), runtime=runtime
        )
        assert m.memory_estimate.projector == want
    fp32 = b.path(b.file("medgemma", "vision-onnx", precision="fp32"))
    assert (
        resources.encoder_bytes(fp32, runtime="openvino") - resources.encoder_bytes(fp32)
        == int(fp32.stat().st_size * 1.7) - fp32.stat().st_size
    )


def test_an_fp32_engine_that_does_not_fit_gives_way_to_an_int8_file(engines_bundle, monkeypatch, caplog):
    from edge.device import resources

    monkeypatch.setattr(accel, "cpu_class", lambda flags=None: "bf16")  # ov-bf16 (fp32 file) first
    b = open_bundle(engines_bundle)
    with MedGemma(b, n_ctx=256, image_encoder="onnx") as m:
        assert m.encoder.plan[0][0].name == "ov-bf16"
        heavy = m.memory_estimate.total
    monkeypatch.setattr(resources, "available_memory", lambda: heavy - 1)
    caplog.set_level(logging.INFO)
    with MedGemma(b, n_ctx=256, image_encoder="onnx") as m:
        assert m.encoder.plan[0][0].precision != "fp32" and m.memory_estimate.total < heavy
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
        pieces = list(m.stream(msgs, images=[_image()], options=GenerateOptions(max_tokens=2, stop=[])))
        assert pieces[-1].usage["completion_tokens"] >= 1  # and it answers
    lines = [r.getMessage() for r in caplog.records if "would not fit" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("image encoder: ov-bf16 would not fit")


def test_openvino_device_choice_falls_back(monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    assert accel.openvino_device("CPU") == "CPU"
    assert accel.openvino_device("NPU") == "CPU"  # this machine has none
    assert any("NPU requested" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("engine", ["ort-int8-static", "ov-int8"])
def test_static_int8_batches_equal_batch_one(engines_bundle, engine):
    px = _pixels(3)
    enc = _encoder(engines_bundle, engine)
    batch = enc.encode_pixels(px)
    ones = np.concatenate([enc.encode_pixels(px[i : i + 1]) for i in range(3)])
    assert np.array_equal(batch, ones) if engine.startswith("ort") else np.allclose(batch, ones, atol=1e-4)


def test_order_follows_the_cpu_class_and_the_fidelity_bar(engines_bundle, monkeypatch):
    files = open_bundle(engines_bundle).files("medgemma")
    roles = {"vision-onnx", "vision-openvino"}
    monkeypatch.setattr(accel, "cpu_flags", lambda: frozenset({"avx2"}))
    names = [e.name for e, _ in encoders.candidates(files, roles, bar=0.0)]
    assert names[0] == "ort-int8" and "ov-bf16" not in names  # no native bf16: not offered
    monkeypatch.setattr(accel, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    names = [e.name for e, _ in encoders.candidates(files, roles, bar=0.0)]
    assert names[:2] == ["ov-bf16", "ov-int8"]
    bar = encoders.fidelity_of(files, "ov-int8") + 1e-9  # ov-int8 below it, ort-fp32 above
    strict = [e.name for e, _ in encoders.candidates(files, roles, bar=bar)]
    assert strict.index("ort-fp32") < strict.index("ov-int8")  # under the bar: after those that meet it


def test_low_memory_profiles_prefer_int8_files(engines_bundle, monkeypatch):
    monkeypatch.setattr(accel, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert _encoder(engines_bundle).plan[0][0].name == "ov-bf16"  # fp32 weights, bf16 compute
    phone = _encoder(engines_bundle, keep=False)  # a phone profile gives the encoder's memory back
    assert phone.plan[0][1]["precision"] != "fp32" and phone.entry["precision"] != "fp32"


def test_calibration_records_the_fastest_that_meets_the_bar(engines_bundle, tmp_path):
    b = open_bundle(engines_bundle)
    result = calibrate(b, _image(), threads=1, bar=0.99)
    rows = result["engines"]
    assert {"ort-fp32", "ort-int8", "ort-int8-static"} <= set(rows)
    assert rows["ort-fp32"]["cosine_min_vs_fp32"] == pytest.approx(1.0)
    good = {n: r["seconds"] for n, r in rows.items() if r["meets_bar"]}
    assert result["choice"] == min(good, key=good.get)
    assert encoders.recorded_choice(b.fingerprint("medgemma")) == result["choice"]
    enc = _encoder(engines_bundle)  # auto: the recorded choice first
    enc.encode_pixels(_pixels())
    assert enc.engine == result["choice"]


def test_damaged_state_is_ignored(engines_bundle):
    path = encoders.state_path()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert encoders.recorded_choice(open_bundle(engines_bundle).fingerprint("medgemma")) is None


def _pixels(n: int = 1) -> np.ndarray:
    return np.random.RandomState(7).uniform(-1, 1, (n, 3, 128, 128)).astype(np.float32)


# --- MedSigLIP: the fused, static int8 towers ---------------------------------------------------


@pytest.fixture(scope="session")
def siglip_static_bundle(medsiglip_twin, tmp_path_factory):
    from export.onnx.medsiglip import export_medsiglip

    root = tmp_path_factory.mktemp("siglip-static") / "bundle"
    export_medsiglip(
        medsiglip_twin, bundle=root, precisions="int8,int8-static", fidelity_images=3, calibration_images=3
    )
    return root


def test_medsiglip_static_export_records_its_graph(siglip_static_bundle):
    import onnx

    b = open_bundle(siglip_static_bundle)
    comp = b.component("medsiglip")
    assert comp["precisions"] == ["int8", "int8-static"] and comp["default_precision"] == "int8"
    vision = b.file("medsiglip", "vision", precision="int8-static")
    assert vision["calibration"] == {"kind": "generated", "images": 3, "seed": 0}
    assert "fused" in vision["graph"] and "static" in vision["quantization"]
    ops = {n.op_type for n in onnx.load(str(b.path(vision))).graph.node}
    assert {"MultiHeadAttention", "QuantizeLinear", "DequantizeLinear"} <= ops
    fid = comp["fidelity"]["int8-static"]
    assert fid["vision"]["cosine_min"] > 0.99 and fid["text"]["cosine_min"] > 0.99
    assert all(z["top1_agreement"] == 1.0 for z in fid["zero_shot"].values())
    assert b.verify().ok


def test_medsiglip_static_batches_equal_batch_one(siglip_static_bundle):
    from edge.medsiglip.model import MedSigLIP
    from export.onnx.fidelity import sample_images

    images = sample_images(5, seed=3)
    sig = MedSigLIP(siglip_static_bundle, precision="int8-static", threads=1)
    assert sig.default_batch() == 8
    batched = sig.embed_images(images)
    ones = sig.embed_images(images, batch_size=1)
    assert np.abs(batched - ones).max() < 1e-5  # float rounding only: the scales don't move
    dyn = MedSigLIP(siglip_static_bundle, precision="int8", threads=1)
    assert _cos(dyn.embed_images(images, batch_size=1), ones) > 0.99
    assert sig.classify(images[0], label_set="cxr").precision == "int8-static"


def test_calibration_folder_is_read_and_checked(tmp_path):
    from edge.errors import InputError
    from export.onnx.static_quant import calibration_images

    for i in range(3):
        Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "notes.txt").write_text("ignored")
    imgs, info = calibration_images(tmp_path, 10)
    assert len(imgs) == 3 and info == {"kind": "folder", "images": 3}
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no readable image"):
        calibration_images(empty, 4)
    with pytest.raises(InputError, match="not a directory"):
        calibration_images(tmp_path / "nope", 4)


def test_generated_calibration_images_differ_from_the_fidelity_images():
    from export.onnx.fidelity import sample_images
    from export.onnx.static_quant import generated_images

    gen = [np.asarray(im.convert("RGB")) for im in generated_images(6)]
    fid = [np.asarray(im.convert("RGB")) for im in sample_images(6)]
    assert not any(g.shape == f.shape and np.array_equal(g, f) for g in gen for f in fid)
    assert all(
        np.array_equal(a, np.asarray(b.convert("RGB"))) for a, b in zip(gen, generated_images(6), strict=True)
    )


def test_the_image_engine_setting_names_every_engine():
    from edge.device.encoders import ENGINES
    from edge.medgemma.settings import IMAGE_ENGINES

    assert set(IMAGE_ENGINES) == {"auto", *ENGINES}


def test_medsiglip_fusion_fuses_every_layer_of_an_sdpa_built_tower(tmp_path):
    """transformers builds SDPA attention by default; onnxruntime's CLIP fusion only knows the
    eager pattern, so the fused graph switches the tower to eager before exporting."""
    import onnx
    import transformers

    from export.onnx import medsiglip_fused
    from export.twin import siglip_config

    cfg = transformers.SiglipVisionConfig(**siglip_config("tiny")["vision_config"])
    model = transformers.SiglipVisionModel(cfg).eval()
    assert model.config._attn_implementation == "sdpa"
    graph = onnx.load(str(medsiglip_fused.fused_encoder(model.vision_model, tmp_path)))
    fused = sum(n.op_type == "MultiHeadAttention" for n in graph.graph.node)
    assert fused == cfg.num_hidden_layers
