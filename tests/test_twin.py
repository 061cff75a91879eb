import json
import math

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from edge.bundle import registry
from export import twin


def _image(seed: int, size=(200, 300)) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(*size, 3) * 255).astype("uint8"))


def test_medgemma_twin_loads_in_transformers_with_every_weight(medgemma_twin):
    model, info = transformers.Gemma3ForConditionalGeneration.from_pretrained(
        medgemma_twin, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing/unexpected keys: the layout is the released one
    cfg = model.config
    assert cfg.text_config.query_pre_attn_scalar == cfg.text_config.head_dim
    assert cfg.text_config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert twin.twin_info(medgemma_twin)["synthetic"] is True


def test_medgemma_twin_saved_in_released_layout(medgemma_twin):
    from safetensors import safe_open

    with safe_open(str(medgemma_twin / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("vision_tower.vision_model.") for k in keys)
    assert any(k.startswith("language_model.model.layers.") for k in keys)
    assert any(k.startswith("multi_modal_projector.") for k in keys)
    assert not any(k.startswith("model.") or k == "lm_head.weight" for k in keys)


def test_medgemma_twin_forward_with_image_is_live(medgemma_twin):
    model = transformers.Gemma3ForConditionalGeneration.from_pretrained(medgemma_twin).eval()
    proc = transformers.AutoProcessor.from_pretrained(medgemma_twin)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the x-ray."}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    assert text.startswith("<bos><start_of_turn>user\n<start_of_image>")
    a = proc(text=text, images=_image(0), return_tensors="pt")
    b = proc(text=text, images=_image(1), return_tensors="pt")
    n_img = model.config.mm_tokens_per_image
    assert a["pixel_values"].shape == (1, 3, 128, 128)
    assert int((a["input_ids"] == model.config.image_token_index).sum()) == n_img
    with torch.no_grad():
        la, lb = model(**a).logits[0, -1], model(**b).logits[0, -1]
    assert la.shape == (model.config.text_config.vocab_size,)
    assert la.std() > 1.0, "logits too close together for top-1 comparisons to mean anything"
    assert (la - lb).abs().max() > 0.1, "the image path is dead: different images give the same logits"
    w = model.model.multi_modal_projector.mm_input_projection_weight
    assert w.abs().mean() > 0.01  # transformers initialises it to zeros; the twin must not


def test_medgemma_tokenizer_has_control_tokens(medgemma_twin):
    tok = transformers.AutoTokenizer.from_pretrained(medgemma_twin)
    for t in twin.GEMMA_CONTROL:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] not in (tok.unk_token_id,), t
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    cfg = json.loads((medgemma_twin / "tokenizer_config.json").read_text())
    assert cfg["added_tokens_decoder"]
    assert (medgemma_twin / "tokenizer.model").is_file() and (medgemma_twin / "tokenizer.json").is_file()


def test_medsiglip_twin_shapes(medsiglip_twin):
    model, info = transformers.SiglipModel.from_pretrained(medsiglip_twin, output_loading_info=True)
    assert not any(info.values()), info
    proc = transformers.AutoProcessor.from_pretrained(medsiglip_twin)
    batch = proc(
        text=["a chest x-ray with pleural effusion", "normal skin"],
        images=[_image(0), _image(1)],
        padding="max_length",
        return_tensors="pt",
    )
    assert batch["pixel_values"].shape == (2, 3, 448, 448)
    assert batch["input_ids"].shape == (2, 64)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
    dim = model.config.text_config.projection_size
    assert out.image_embeds.shape == (2, dim) and out.text_embeds.shape == (2, dim)
    assert out.logits_per_image.shape == (2, 2)


def test_twins_are_deterministic(tmp_path, medsiglip_twin):
    again = twin.build_twin("medsiglip", size="tiny", out=tmp_path / "again", seed=0).path
    assert (again / "model.safetensors").read_bytes() == (medsiglip_twin / "model.safetensors").read_bytes()
    other = twin.build_twin("medsiglip", size="tiny", out=tmp_path / "other", seed=1).path
    assert (other / "model.safetensors").read_bytes() != (medsiglip_twin / "model.safetensors").read_bytes()


@pytest.mark.parametrize("kind", ["medgemma-4b-it", "medgemma-1.5-4b-it"])
def test_registry_medgemma_numbers_are_the_full_twins(kind):
    spec = registry.get(kind)
    cfg = transformers.Gemma3Config(**twin.gemma3_config("full"))
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (
        2560,
        34,
        8,
        4,
    )
    assert (t.head_dim, t.intermediate_size, t.vocab_size, t.sliding_window) == (256, 10240, 262208, 1024)
    assert t.query_pre_attn_scalar == t.head_dim
    assert t.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 5 + ["sliding_attention"] * 4
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size, v.image_size) == (
        1152,
        27,
        16,
        14,
        896,
    )
    assert cfg.mm_tokens_per_image == 256 == spec.preprocessor["image_seq_length"]
    for key, value in spec.config["text_config"].items():
        assert getattr(t, key) == value or key in ("torch_dtype", "sliding_window_pattern"), key
    for key, value in spec.config["vision_config"].items():
        assert getattr(v, key) == value or key == "torch_dtype", key
    with torch.device("meta"):
        model = transformers.Gemma3ForConditionalGeneration(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 4.2e9 < n < 4.4e9  # MedGemma 4B: 4.3B parameters


def test_registry_medsiglip_numbers_are_the_full_twins():
    cfg = transformers.SiglipConfig(**twin.siglip_config("full"))
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size, v.image_size) == (
        1152,
        27,
        16,
        14,
        448,
    )
    assert t.max_position_embeddings == 64
    with torch.device("meta"):
        model = transformers.SiglipModel(cfg)
    vision = sum(p.numel() for p in model.vision_model.parameters())
    text = sum(p.numel() for p in model.text_model.parameters())
    assert math.isclose(vision, 428.6e6, rel_tol=0.01) and math.isclose(text, 449.7e6, rel_tol=0.01)


def test_27b_twin_sizes_are_medgemma_only(tmp_path):
    from edge.errors import UsageError

    with pytest.raises(UsageError, match="twin size tiny-27b is MedGemma's only"):
        twin.build_twin("medsiglip", size="tiny-27b", out=tmp_path / "x")
    mid = twin.gemma3_config("mid-27b")["text_config"]
    assert mid["num_hidden_layers"] == 62
    for width in (mid["hidden_size"], mid["intermediate_size"], mid["num_attention_heads"] * mid["head_dim"]):
        assert width % 256 == 0, width  # every row a whole number of K-quant blocks, as in the real 27B
    assert mid["query_pre_attn_scalar"] == mid["hidden_size"] // mid["num_attention_heads"]
