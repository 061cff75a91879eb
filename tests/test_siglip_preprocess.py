"""Device-side MedSigLIP preprocessing equals transformers' SiglipProcessor, from the bundle's spec."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from edge.medsiglip import onnx_towers
from edge.medsiglip.preprocess import image_to_pixels

_rng = np.random.default_rng(0)
IMAGES = {
    "rgb": Image.fromarray(_rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)),
    "rgb-448": Image.fromarray(_rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)),
    "grayscale-L": Image.fromarray(_rng.integers(0, 256, (53, 37), dtype=np.uint8)),
    "16-bit-I;16": Image.fromarray(_rng.integers(0, 65536, (64, 80), dtype=np.uint16)),
    "32-bit-I": Image.fromarray(_rng.integers(-50, 400, (40, 30)).astype(np.int32)),
    "1x1": Image.fromarray(np.array([[[10, 200, 30]]], dtype=np.uint8)),
    "3000x17": Image.fromarray(_rng.integers(0, 256, (17, 3000, 3), dtype=np.uint8)),
    "449x447-RGBA": Image.fromarray(_rng.integers(0, 256, (447, 449, 4), dtype=np.uint8)),
    "palette-P": Image.fromarray(_rng.integers(0, 256, (33, 35), dtype=np.uint8)).convert("P"),
    "LA": Image.fromarray(_rng.integers(0, 256, (20, 21, 2), dtype=np.uint8), mode="LA"),
    "CMYK": Image.fromarray(_rng.integers(0, 256, (25, 24, 4), dtype=np.uint8), mode="CMYK"),
    "float-F": Image.fromarray(_rng.random((16, 16)).astype(np.float32) * 300),
}
TEXTS = [
    "A chest X-ray showing Pleural Effusion.",
    "PNEUMOTHORAX, RIGHT SIDE!!!",
    "what?!... (really) [x] {y} ok; a-b_c/d\\e 'q' \"dq\" #1 @2 $3 %4 ^5 &6 *7 +8 =9 <10> ~11 `12` |13",
    "Héllo wörld — ünïcode ΑΒΓ 日本語 😀 İstanbul ß ﬁ",
    " ".join(["bilateral lower lobe opacities with small effusions"] * 12),  # > 64 tokens
    "x " * 63,
    "",
    "   \t\n  ",
    "tab\tnew\nline  multiple   spaces",
    "foo</s>bar",
    "</s>",
    "end </s>",
    "x <unk> y",
    "\u2581under\u2581score",
    "12 cm 3mm 2025-01-31 4.5×3.2",
]


@pytest.fixture(scope="module")
def reference(medsiglip_twin):
    import transformers

    return transformers.SiglipProcessor.from_pretrained(medsiglip_twin, use_fast=False)


@pytest.mark.parametrize("name", list(IMAGES))
def test_pixels_equal_transformers(medsiglip_bundle, reference, name):
    spec, _ = onnx_towers.load_preprocessing(medsiglip_bundle)
    image = IMAGES[name]
    # the reference path: transformers' convert_to_rgb then the processor; channels_last stated
    # because transformers mistakes a 1x1x3 array for channels-first
    ref = reference.image_processor(
        images=image, do_convert_rgb=True, input_data_format="channels_last", return_tensors="np"
    )["pixel_values"][0]
    got = image_to_pixels(image, spec)
    assert got.dtype == np.float32 and got.shape == ref.shape == (3, 448, 448)
    assert np.array_equal(got, ref), np.abs(got - ref).max()


@pytest.mark.filterwarnings("ignore:This sequence already has")  # "end </s>" is meant to test that
def test_ids_equal_transformers(medsiglip_bundle, reference):
    _, tok = onnx_towers.load_preprocessing(medsiglip_bundle)
    ref = reference(text=TEXTS, padding="max_length", truncation=True, max_length=64)["input_ids"]
    got = tok.batch(TEXTS)
    assert got.shape == (len(TEXTS), 64)
    for text, r, g in zip(TEXTS, ref, got, strict=True):
        assert list(g) == list(r), text
    assert got[4, -1] == tok.eos_id and got[6, 0] == tok.eos_id  # truncated keeps </s>; empty is all </s>
    assert len(set(got[4])) > 3  # the long text is real tokens, not padding


def test_resample_follows_the_checkpoint(medsiglip_twin, tmp_path):
    import transformers

    from export.onnx.medsiglip import preprocessing

    src = tmp_path / "src"
    shutil.copytree(medsiglip_twin, src)
    cfg = json.loads((src / "preprocessor_config.json").read_text())
    cfg["resample"] = 2  # bilinear, as some SigLIP checkpoints use
    (src / "preprocessor_config.json").write_text(json.dumps(cfg))
    proc = transformers.SiglipProcessor.from_pretrained(src, use_fast=False)
    spec, _, _ = preprocessing(src, proc)
    assert spec.resample == "bilinear"
    image = IMAGES["rgb"]
    ref = proc.image_processor(images=image, return_tensors="np")["pixel_values"][0]
    assert np.array_equal(image_to_pixels(image, spec), ref)
    assert not np.array_equal(image_to_pixels(image, spec.__class__(resample="bicubic")), ref)
