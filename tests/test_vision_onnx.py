"""MedGemma's fast image path: the vision tower + projector as ONNX, fed to llama.cpp."""

import io

import numpy as np
from PIL import Image

from edge.medgemma.model import GenerateOptions, MedGemma
from edge.media.images import load_image


def _image(seed: int):
    buf = io.BytesIO()
    # already at the tiny twin's 128 px: both paths see the same pixels, no resampling in between
    Image.fromarray((np.random.RandomState(seed).rand(128, 128, 3) * 255).astype("uint8")).save(buf, "PNG")
    return load_image(buf.getvalue())


def _embeddings(bundle, encoder: str, image) -> tuple[np.ndarray, list[int]]:
    with MedGemma(bundle, n_ctx=256, image_encoder=encoder) as m:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
        m.evaluate(msgs, images=[image])
        (embd,) = m.image_cache.values()
        pieces = list(m.stream(msgs, images=[image], options=GenerateOptions(max_tokens=6, stop=[])))
        n_prompt = pieces[-1].usage["prompt_tokens"]
        generated = m.evaluated_tokens()[n_prompt:]  # image positions hold no ids
    return embd, generated + [pieces[-1].usage["completion_tokens"]]


def test_export_records_fidelity_and_verifies(vision_bundle):
    from edge.bundle.manifest import open_bundle

    b = open_bundle(vision_bundle)
    entries = {f["precision"]: f for f in b.files("medgemma") if f["role"] == "vision-onnx"}
    assert set(entries) == {"fp32", "int8"}
    assert entries["fp32"]["fidelity"]["cosine_min"] >= 0.99999
    assert entries["int8"]["fidelity"]["cosine_min"] >= 0.99
    assert b.verify().ok  # the GGUF files kept their place; the new files are hashed


def test_onnx_and_mmproj_paths_agree(vision_bundle):
    image = _image(3)
    a, ids_a = _embeddings(vision_bundle, "mmproj", image)
    b, ids_b = _embeddings(vision_bundle, "onnx", image)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= 0.99, cos.min()
    assert ids_a == ids_b  # same prompt, same greedy continuation


def test_onnx_path_caches_like_the_mmproj_path(vision_bundle):
    with MedGemma(vision_bundle, n_ctx=256, image_encoder="onnx") as m:
        assert m.info["image_encoder"] == "medgemma/vision-int8.onnx"
        image = _image(4)
        first = m.ask("Describe.", images=[image], options=GenerateOptions(max_tokens=2))
        second = m.ask("More?", images=[image], options=GenerateOptions(max_tokens=2))
    assert first.image_cache == {"hits": 0, "misses": 1} and second.image_cache == {"hits": 1, "misses": 0}


def test_attention_rewrite_keeps_the_arithmetic():
    """Attention (packed QKV, CPU kernel with full score matrices) → MatMuls + MultiHeadAttention
    (CPU flash attention): the same outputs."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export.onnx.mha import attention_to_mha

    rng = np.random.RandomState(0)
    d, heads, s = 32, 4, 50
    w = numpy_helper.from_array(rng.randn(d, 3 * d).astype(np.float32) * 0.2, "w")
    b = numpy_helper.from_array(rng.randn(3 * d).astype(np.float32) * 0.1, "b")
    node = helper.make_node(
        "Attention", ["x", "w", "b"], ["y"], name="att", domain="com.microsoft", num_heads=heads
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, s, d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, s, d])],
        [w, b],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    x = rng.randn(1, s, d).astype(np.float32)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": x}
        )[0]

    before = run(model)
    assert attention_to_mha(model) == 1
    assert [n.op_type for n in model.graph.node] == ["MatMul", "MatMul", "MatMul", "MultiHeadAttention"]
    onnx.checker.check_model(model)
    assert np.abs(run(model) - before).max() < 1e-5


def test_exported_vision_graph_uses_multihead_attention(vision_bundle):
    import onnx

    from edge.bundle.manifest import open_bundle

    b = open_bundle(vision_bundle)
    entry = next(
        f for f in b.files("medgemma") if f.get("precision") == "fp32" and f["role"] == "vision-onnx"
    )
    ops = [n.op_type for n in onnx.load(str(b.path(entry)), load_external_data=False).graph.node]
    assert "MultiHeadAttention" in ops and "Attention" not in ops
