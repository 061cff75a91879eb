"""Prompt segments, embedding decode and KV reuse (edge/medgemma/kv_prefix.py, llama_binding.py) on the
tiny MedGemma twin."""

import ctypes
import io
import threading

import numpy as np
import pytest
from PIL import Image

from edge.medgemma import llama_binding
from edge.medgemma.kv_prefix import ImageSegment, reusable_prefix
from edge.medgemma.model import GenerateOptions, MedGemma
from edge.media.images import load_image

GREEDY = GenerateOptions(max_tokens=8, stop=[])


def _image(seed: int):
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(80, 112, 3) * 255).astype("uint8")).save(buf, "PNG")
    return load_image(buf.getvalue())


def _msgs(question: str, image: bool = True):
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def _tokens(m: MedGemma, pieces) -> list[int]:
    n_prompt = pieces[-1].usage["prompt_tokens"]
    return m.evaluated_tokens()[n_prompt:]


def test_reusable_prefix_never_splits_an_image():
    img = [("k", i) for i in range(4)]
    assert reusable_prefix([1, 2, *img, 5, 6], [1, 2, *img, 5, 7, 8]) == 7
    assert reusable_prefix([1, 2, *img, 5], [1, 2, *[("j", i) for i in range(4)], 5]) == 2
    assert reusable_prefix([1, 2, *img[:2]], [1, 2, *img, 9]) == 2  # the cache holds half an image
    assert reusable_prefix([1, 2, 3], [1, 2, 3]) == 2  # the last prompt position is always evaluated
    assert reusable_prefix([], [1, 2]) == 0


def test_split_prompt_tokenizes_like_libmtmd(twin_llm_bundle):
    """Our segments carry exactly the text tokens libmtmd's own tokenizer gives."""
    import llama_cpp.mtmd_cpp as mtmd_cpp

    with MedGemma(twin_llm_bundle, n_ctx=256, image_encoder="mmproj") as m:
        text, _ = m.render(_msgs("Describe, please: <b>x</b> 12.5 cm"))
        ours = [s for s in m.segments(text, [_image(1)]) if not isinstance(s, ImageSegment)]
        rgb = np.asarray(_image(1).image, dtype=np.uint8)
        buf = (ctypes.c_uint8 * rgb.nbytes).from_buffer_copy(rgb.tobytes())
        bitmap = mtmd_cpp.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], buf)
        raw = text.encode()
        inp = mtmd_cpp.mtmd_input_text()
        inp.text, inp.text_len, inp.add_special, inp.parse_special = raw, len(raw), False, True
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        assert (
            mtmd_cpp.mtmd_tokenize(
                m.encoder.ctx, chunks, ctypes.byref(inp), (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap), 1
            )
            == 0
        )
        theirs, n_image = [], 0
        for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
            chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
            if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                theirs.append([ptr[j] for j in range(n.value)])
            else:
                n_image = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
        mtmd_cpp.mtmd_input_chunks_free(chunks)
        mtmd_cpp.mtmd_bitmap_free(bitmap)
        assert ours == theirs and len(ours) == 2
        assert m.encoder.tokens_for(_image(1)) == n_image == 16


def test_embedding_decode_equals_libmtmd_helper(twin_llm_bundle):
    """decode_embeddings (no libmtmd context needed) gives logits identical to
    mtmd_helper_decode_image_chunk on the same embeddings."""
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd_cpp

    with MedGemma(twin_llm_bundle, n_ctx=256, image_encoder="mmproj") as m:
        image = _image(2)
        m.evaluate(_msgs("Describe."), images=[image])
        ours = m.last_logits()
        text, _ = m.render(_msgs("Describe."))
        segments = m.segments(text, [image])
        embd = m.image_cache.get(segments[1].key)
        m.llama.reset()
        llama_binding.clear_kv(m.llama)
        m.llama.eval(segments[0])
        with m.encoder.image_chunk(image) as chunk:
            n_past = llama_binding.n_evaluated(m.llama)
            new_n_past = llama_cpp.llama_pos(n_past)
            rc = mtmd_cpp.mtmd_helper_decode_image_chunk(
                m.encoder.ctx,
                llama_binding.context(m.llama),
                chunk,
                embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                n_past,
                0,
                m.llama.n_batch,
                ctypes.byref(new_n_past),
                ctypes.cast(None, mtmd_cpp.mtmd_helper_post_decode_callback),
                None,
            )
        assert rc == 0
        llama_binding.set_evaluated(m.llama, new_n_past.value)
        m.llama.eval(segments[2])
        m.forget_context()
        theirs = m.last_logits()
    assert np.array_equal(ours, theirs)
    assert np.abs(ours).max() > 0


def test_follow_up_reuses_the_cache_and_answers_the_same(twin_llm_bundle):
    image = _image(3)
    with MedGemma(twin_llm_bundle, n_ctx=512) as m:
        first = list(m.stream(_msgs("Describe."), images=[image], options=GREEDY))
        answer = "".join(p.text for p in first)
        convo = _msgs("Describe.") + [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And the left side?"},
        ]
        follow = list(m.stream(convo, images=[image], options=GREEDY))
        reused = follow[-1].timings["kv_reused_tokens"]
        warm_tokens, warm_logits = _tokens(m, follow), m.last_logits()
        new_q = list(m.stream(_msgs("Any fracture?"), images=[image], options=GREEDY))
        assert new_q[-1].timings["kv_reused_tokens"] > 16  # up to and including the image
        assert new_q[-1].timings["image_encode_s"] == 0
    with MedGemma(twin_llm_bundle, n_ctx=512) as cold:  # nothing held: everything evaluated
        follow_cold = list(cold.stream(convo, images=[image], options=GREEDY))
        assert follow_cold[-1].timings["kv_reused_tokens"] == 0
        cold_tokens, cold_logits = _tokens(cold, follow_cold), cold.last_logits()
    # the whole first prompt (image included) is kept, but for its last "\n": the twin's answer
    # is newlines, which the template trims when it renders the answer back
    assert reused >= first[-1].usage["prompt_tokens"] - 1 > 16
    assert follow[-1].timings["image_cache_hits"] == 1 and follow[-1].timings["image_cache_misses"] == 0
    assert warm_tokens == cold_tokens
    assert np.abs(warm_logits - cold_logits).max() < 1e-3


def test_cancelled_prefill_leaves_nothing_stale(twin_llm_bundle):
    image, other = _image(4), _image(5)
    with MedGemma(twin_llm_bundle, n_ctx=512) as m:
        list(m.stream(_msgs("Describe."), images=[image], options=GREEDY))
        cancel = threading.Event()
        cancel.set()
        pieces = list(m.stream(_msgs("Describe."), images=[other], options=GREEDY, cancel=cancel))
        assert pieces[-1].finish_reason == "cancelled"
        again = list(m.stream(_msgs("Describe."), images=[image], options=GREEDY))
        tokens = _tokens(m, again)
    with MedGemma(twin_llm_bundle, n_ctx=512) as fresh:
        assert (
            _tokens(fresh, list(fresh.stream(_msgs("Describe."), images=[image], options=GREEDY))) == tokens
        )


@pytest.mark.parametrize("options", [{"swa_full": False}, {"repack": False}, {"image_encoder": "mmproj"}])
def test_memory_saving_options_answer_the_same(twin_llm_bundle, options):
    image = _image(6)
    with MedGemma(twin_llm_bundle, n_ctx=512) as m:
        ref = [_tokens(m, list(m.stream(_msgs(q), images=[image], options=GREEDY))) for q in ("A?", "B?")]
    with MedGemma(twin_llm_bundle, n_ctx=512, **options) as m:
        got = [_tokens(m, list(m.stream(_msgs(q), images=[image], options=GREEDY))) for q in ("A?", "B?")]
        assert m.memory_estimate.repacked == 0 or options.get("repack", True)
    assert got == ref


def test_prepare_image_encodes_and_prefills(twin_llm_bundle):
    image = _image(7)
    events = []
    with MedGemma(twin_llm_bundle, n_ctx=256) as m:
        first = m.prepare_image(image, progress=lambda *e: events.append(e))
        again = m.prepare_image(image)
        answer = m.ask("Describe.", images=[image], options=GenerateOptions(max_tokens=2))
        only_encoded = m.prepare_image(_image(9), prefill=False)
        assert only_encoded["prefilled_tokens"] == 0 and only_encoded["encode_s"] > 0
    assert not first["cached"] and first["encode_s"] > 0 and first["prefilled_tokens"] > 16
    assert again["cached"] and again["prefilled_tokens"] == first["prefilled_tokens"]
    assert events == [("image", 0, 1), ("image", 1, 1)]
    assert answer.image_cache == {"hits": 1, "misses": 0}
    assert answer.timings["kv_reused_tokens"] == first["prefilled_tokens"]  # the question alone was evaluated


def test_onnx_encoder_runs_without_the_mmproj(vision_bundle):
    with MedGemma(vision_bundle, n_ctx=256) as m:
        assert m.encoder.name == "onnx" and not hasattr(m.encoder, "ctx")  # no libmtmd context
        assert m.info["image_encoder"] == "medgemma/vision-int8.onnx"
        answer = m.ask("Describe.", images=[_image(8)], options=GenerateOptions(max_tokens=2))
        assert answer.image_cache == {"hits": 0, "misses": 1} and answer.usage["prompt_tokens"] > 16
