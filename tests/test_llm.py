"""The edge runtime's MedGemma path: real Gemma 3 270M for language, the tiny twin for images."""

import io
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import jsonschema
import numpy as np
import pydicom
import pytest
from conftest import png_header_only, run_cli
from PIL import Image

from edge.errors import Busy, ContextOverflow, IntegrityError, MissingDependency, UsageError
from edge.medgemma.model import GenerateOptions
from edge.media.images import load_image

DICOM_DIR = Path(pydicom.__file__).parent / "data" / "test_files"
QUESTION = "What are the common symptoms of pneumonia?"


def _png_bytes(seed: int, size=(96, 128)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(*size, 3) * 255).astype("uint8")).save(buf, "PNG")
    return buf.getvalue()


def test_stream_yields_pieces_then_finish(small_model):
    pieces = list(
        small_model.stream([{"role": "user", "content": QUESTION}], options=GenerateOptions(max_tokens=24))
    )
    assert len(pieces) > 3 and all(p.finish_reason is None for p in pieces[:-1])
    last = pieces[-1]
    assert last.finish_reason in ("stop", "length") and last.usage["completion_tokens"] <= 24
    assert last.usage["prompt_tokens"] > 5 and last.timings["generation_tps"] > 0
    text = "".join(p.text for p in pieces)
    assert len(text.split()) > 3


def test_template_comes_from_the_registry_when_the_gguf_has_none(small_model):
    assert "tokenizer.chat_template" not in small_model.llama.metadata
    prompt, _ = small_model.render(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    )
    assert prompt == "<bos>Be brief.\n\nQuestion: Hi?\nAnswer:"


def test_real_answer_is_on_topic(small_model):
    a = small_model.ask(QUESTION, options=GenerateOptions(max_tokens=48))
    assert a.finish_reason in ("stop", "length")
    assert any(w in a.text.lower() for w in ("fever", "cough", "chest", "breath")), a.text
    assert "not a diagnosis" in a.disclaimer


def test_seed_makes_sampling_repeatable(small_model):
    def sample(seed):
        return small_model.ask(
            QUESTION, options=GenerateOptions(max_tokens=16, temperature=0.9, seed=seed)
        ).text

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def test_cancel_from_another_thread_stops_within_a_token(small_model):
    cancel = threading.Event()
    counts = []
    last = None
    for piece in small_model.stream(
        [{"role": "user", "content": QUESTION}], options=GenerateOptions(max_tokens=200), cancel=cancel
    ):
        if piece.finish_reason is None and not cancel.is_set():
            counts.append(piece.n_tokens)
            threading.Thread(target=cancel.set).start()
        last = piece
    assert last.finish_reason == "cancelled"
    assert last.usage["completion_tokens"] <= counts[0] + 2


def test_busy_when_not_waiting(small_model):
    gen = small_model.stream([{"role": "user", "content": QUESTION}], options=GenerateOptions(max_tokens=50))
    next(gen)  # holds the model
    with pytest.raises(Busy):
        next(small_model.stream([{"role": "user", "content": "x"}], wait=False))
    gen.close()
    assert not small_model.busy


def test_json_schema_output_parses_and_validates(small_model):
    schema = {
        "type": "object",
        "properties": {
            "finding": {"type": "string", "enum": ["pneumonia", "effusion", "normal"]},
            "side": {"type": "string", "maxLength": 12},
            "lobes": {"type": "array", "items": {"enum": ["upper", "middle", "lower"]}, "maxItems": 3},
        },
        "required": ["finding", "side", "lobes"],
    }
    a = small_model.ask(
        "Chest x-ray with a right lower lobe consolidation. Report as JSON.",
        options=GenerateOptions(max_tokens=96, schema=schema),
    )
    assert a.finish_reason == "stop", a.text
    jsonschema.validate(json.loads(a.text), schema)
    assert a.parsed == json.loads(a.text) and a.schema_errors == []


def test_schema_rules_the_grammar_cant_enforce_are_reported(small_model):
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "maximum": -1000000}},
        "required": ["n"],
    }
    a = small_model.ask("Give a number as JSON.", options=GenerateOptions(max_tokens=32, schema=schema))
    assert a.finish_reason == "stop" and isinstance(a.parsed["n"], int)
    assert a.schema_errors and "n:" in a.schema_errors[0]


def test_prompt_longer_than_context_is_refused_with_counts(small_model_bundle):
    from edge.medgemma.model import MedGemma

    with (
        MedGemma(small_model_bundle, n_ctx=32) as m,
        pytest.raises(ContextOverflow, match=r"needs \d+ tokens.*holds 32"),
    ):
        m.ask("pneumonia " * 100)


@pytest.mark.parametrize("maker", ["png", "jpeg", "dicom"])
def test_twin_answers_about_images_and_caches_them(twin_model, maker, tmp_path):
    if maker == "dicom":
        path = DICOM_DIR / "CT_small.dcm"
    else:
        path = tmp_path / f"x.{maker}"
        Image.open(io.BytesIO(_png_bytes(5))).save(path, "PNG" if maker == "png" else "JPEG")
    image = load_image(path)
    opts = GenerateOptions(max_tokens=4)
    twin_model.forget_context()  # the session's model: other tests may have seen the same image
    twin_model.image_cache.clear()
    first = twin_model.ask("Describe this image.", images=[image], options=opts)
    second = twin_model.ask("Anything else?", images=[image], options=opts)
    assert first.image_cache == {"hits": 0, "misses": 1} and first.timings["image_encode_s"] > 0
    assert second.image_cache == {"hits": 1, "misses": 0} and second.timings["image_encode_s"] == 0
    assert first.usage["prompt_tokens"] > 16  # the 16 image tokens of the tiny twin are in the prompt


def test_cached_embeddings_give_the_same_logits_as_encoding(twin_model):
    image = load_image(_png_bytes(11))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]

    def last_logits():
        twin_model.evaluate(msgs, images=[image])
        return twin_model.last_logits()

    fresh = last_logits()  # encodes (cache miss), then decodes the copied embeddings
    twin_model.forget_context()  # forget the KV cache's contents: the image is decoded again, from the cache
    cached = last_logits()
    other = load_image(_png_bytes(12))
    twin_model.evaluate(msgs, images=[other])
    different = twin_model.last_logits()
    assert np.array_equal(fresh, cached)
    assert np.abs(fresh - different).max() > 1e-3  # the image matters: the path is live


def test_disk_image_cache_survives_a_new_model(twin_llm_bundle, tmp_path):
    from edge.medgemma.model import MedGemma
    from edge.media.image_cache import ImageCache

    image = load_image(_png_bytes(21))
    opts = GenerateOptions(max_tokens=2)
    for expected in ({"hits": 0, "misses": 1}, {"hits": 1, "misses": 0}):
        with MedGemma(twin_llm_bundle, n_ctx=256, image_cache=ImageCache(disk_dir=tmp_path / "c")) as m:
            assert m.ask("Describe.", images=[image], options=opts).image_cache == expected


# --- the CLI, as a user runs it ------------------------------------------------------------------


def test_cli_ask_json(small_model_bundle):
    r = run_cli("ask", "-b", str(small_model_bundle), QUESTION, "--max-tokens", "12", "--json")
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert obj["ok"] and obj["text"] and obj["finish_reason"] in ("stop", "length")
    assert set(obj) >= {"usage", "timings", "model", "image_cache", "disclaimer", "parsed"}


def test_cli_ask_streams_text_with_disclaimer(twin_llm_bundle, tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(_png_bytes(3))
    r = run_cli("ask", "-b", str(twin_llm_bundle), "Describe.", "--image", str(p), "--max-tokens", "3")
    assert r.returncode == 0, r.stderr
    assert "not a diagnosis" in r.stdout and "SYNTHETIC TWIN" in r.stdout


@pytest.mark.parametrize(
    "case,code,message",
    [
        ("text", 3, "not an image"),
        ("truncated", 3, "truncated or corrupt"),
        ("huge", 3, "2500000000 pixels"),
        ("no_pixels", 3, "no pixel data"),
        ("jpeg_lossless", 3, "JPEG Lossless"),
    ],
)
def test_cli_bad_images(twin_llm_bundle, tmp_path, case, code, message):
    p = tmp_path / "input"
    if case == "text":
        p.write_text("not an image")
    elif case == "truncated":
        p.write_bytes(_png_bytes(4)[:300])
    elif case == "huge":
        p.write_bytes(png_header_only(50000, 50000))
    elif case == "no_pixels":
        p = DICOM_DIR / "rtplan.dcm"
    else:
        p = DICOM_DIR / "SC_rgb_jpeg_gdcm.dcm"  # no decoder for JPEG Lossless (process 14) here
    r = run_cli("ask", "-b", str(twin_llm_bundle), "Describe.", "--image", str(p))
    assert r.returncode == code and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_prompt_over_context_exit_4(small_model_bundle):
    r = run_cli("ask", "-b", str(small_model_bundle), "pneumonia " * 200, "--ctx", "64")
    assert r.returncode == 4 and "context holds 64" in r.stderr


def test_cli_memory_budget_exit_4(small_model_bundle):
    r = run_cli("ask", "-b", str(small_model_bundle), "Hi", env={"MEDGEMMA_EDGE_MEMORY_BUDGET": "100M"})
    assert r.returncode == 4 and "GiB free" in r.stderr


def test_cli_missing_or_tampered_bundle_file(twin_llm_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(twin_llm_bundle, copy)
    mmproj = next((copy / "medgemma").glob("mmproj-*.gguf"))
    data = bytearray(mmproj.read_bytes())
    data[-1] ^= 0xFF
    mmproj.write_bytes(bytes(data))
    r = run_cli("ask", "-b", str(copy), "Describe.")
    assert r.returncode == 3 and mmproj.name in r.stderr and "sha256" in r.stderr
    mmproj.unlink()
    r = run_cli("ask", "-b", str(copy), "Describe.")
    assert r.returncode == 3 and mmproj.name in r.stderr and "missing" in r.stderr


def test_integrity_error_from_library(twin_llm_bundle, tmp_path):
    from edge.medgemma.model import MedGemma

    copy = tmp_path / "b"
    shutil.copytree(twin_llm_bundle, copy)
    text = next((copy / "medgemma").glob("text-*.gguf"))
    text.write_bytes(text.read_bytes()[:1000])
    with pytest.raises(IntegrityError, match=text.name):
        MedGemma(copy)


def test_settings_object_and_keyword_overrides(small_model_bundle):
    from edge.medgemma.model import MedGemma
    from edge.medgemma.settings import MedGemmaSettings

    with MedGemma(small_model_bundle, MedGemmaSettings(n_ctx=512, kv_type="q8_0"), n_ctx=256) as m:
        assert m.settings == MedGemmaSettings(n_ctx=256, kv_type="q8_0")  # the keyword wins
        assert m.n_ctx == 256 and m.info["n_ctx"] == 256
    with pytest.raises(UsageError, match="n_ctxx"):
        MedGemma(small_model_bundle, n_ctxx=256)
    with pytest.raises(UsageError, match="kv_type.*q5_9"):
        MedGemma(small_model_bundle, kv_type="q5_9")


def test_binding_version_is_checked():
    import llama_cpp

    from edge.medgemma import llama_binding

    assert llama_binding.binding() is llama_cpp  # the installed binding is the supported one
    llama_binding.check_version(llama_cpp.__version__)
    with pytest.raises(MissingDependency, match=r"llama-cpp-python 0\.2\.90 is installed.*0\.3\.36"):
        llama_binding.check_version("0.2.90")


def test_ask_works_with_the_network_blocked(small_model_bundle):
    """Offline guarantee: every socket connect raises; the answer still comes, and none was tried."""
    code = f"""
import socket, sys
attempts = []
def deny(*a, **k):
    attempts.append(a)
    raise OSError("network blocked by test")
socket.socket.connect = deny
socket.socket.connect_ex = deny
socket.create_connection = deny
from medgemma_edge.cli import main
rc = main(["ask", "-b", {str(small_model_bundle)!r}, "What is pneumonia?", "--max-tokens", "8", "--json"])
print("ATTEMPTS", len(attempts), file=sys.stderr)
sys.exit(rc)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["text"]
    assert "ATTEMPTS 0" in r.stderr
