"""Checkpoint validation before any export work, and the two layouts transformers saves."""

import json
import os

import numpy as np
import pytest
from conftest import run_cli
from fixtures_gguf import edit_config

from export.gguf.checkpoint import inspect_checkpoint, layer_types, llama_cpp_layer_types


def _split_into_missing_shard(ckpt):
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "np") as f:
        keys = sorted(f.keys())
    os.rename(ckpt / "model.safetensors", ckpt / "model-00001-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in keys}
    weight_map["language_model.model.extra.weight"] = "model-00002-of-00002.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _truncate_weights(ckpt):
    p = ckpt / "model.safetensors"
    os.truncate(p, p.stat().st_size - 4096)


def _remove_tokenizer(ckpt):
    (ckpt / "tokenizer.model").unlink()
    (ckpt / "tokenizer.json").unlink()


def _remove_chat_template(ckpt):
    (ckpt / "chat_template.jinja").unlink()
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))


def _bad_scalar(ckpt):
    edit_config(ckpt, lambda c: c["text_config"].update(query_pre_attn_scalar=64))


def _alternating_layers(ckpt):
    edit_config(
        ckpt, lambda c: c["text_config"].update(layer_types=["sliding_attention", "full_attention"] * 3)
    )


def _not_gemma3(ckpt):
    edit_config(ckpt, lambda c: c.update(architectures=["LlavaForConditionalGeneration"]))


BROKEN = {
    "missing shard": (_split_into_missing_shard, "shard model-00002-of-00002.safetensors listed in"),
    "incomplete shard": (_truncate_weights, "is incomplete"),
    "no tokenizer": (_remove_tokenizer, "has no tokenizer"),
    "no chat template": (_remove_chat_template, "has no chat template"),
    "query_pre_attn_scalar": (_bad_scalar, "query_pre_attn_scalar is 64 but head_dim is 32"),
    "layer pattern": (_alternating_layers, "not the 5 local : 1 global pattern"),
    "architecture": (
        _not_gemma3,
        "LlavaForConditionalGeneration checkpoint, not Gemma3ForConditionalGeneration",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoint_fails_before_writing(case, twin_copy, tmp_path):
    breaker, message = BROKEN[case]
    breaker(twin_copy)
    bundle = tmp_path / "out" / "bundle"
    r = run_cli("export", "medgemma", str(twin_copy), "--bundle", str(bundle), "--quant", "Q8_0")
    assert r.returncode == 3, r.stderr
    assert message in r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr  # one line
    assert not (tmp_path / "out").exists()  # nothing written, not even the parent


def test_non_gemma3_checkpoint_is_refused(medsiglip_twin, gguf_bundle_copy):
    before = (gguf_bundle_copy / "manifest.json").read_bytes()
    r = run_cli("export", "medgemma", str(medsiglip_twin), "--bundle", str(gguf_bundle_copy), "--json")
    assert r.returncode == 3
    err = json.loads(r.stdout)["error"]
    assert "SiglipModel checkpoint, not Gemma3ForConditionalGeneration" in err["message"]
    assert (gguf_bundle_copy / "manifest.json").read_bytes() == before  # the existing bundle is untouched


def test_layer_pattern_helpers():
    assert layer_types({"num_hidden_layers": 34, "sliding_window_pattern": 6}) == llama_cpp_layer_types(34)
    assert llama_cpp_layer_types(12)[5] == llama_cpp_layer_types(12)[11] == "full_attention"
    assert layer_types({"num_hidden_layers": 4, "sliding_window_pattern": 2})[1] == "full_attention"


def _to_transformers5_layout(ckpt):
    from safetensors.numpy import load_file, save_file

    st = load_file(str(ckpt / "model.safetensors"))
    out = {}
    for k, v in st.items():
        for old, new in (
            ("language_model.model.", "model.language_model."),
            ("vision_tower.vision_model.", "model.vision_tower.vision_model."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
        ):
            if k.startswith(old):
                out[new + k[len(old) :]] = v
                break
        else:
            raise AssertionError(k)
    out["lm_head.weight"] = st["language_model.model.embed_tokens.weight"].copy()  # saved tied copy
    save_file(out, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_transformers5_layout_converts_to_the_same_gguf(twin_copy, gguf_bundle, tmp_path):
    import gguf

    from export.gguf.convert import export_medgemma

    keys = _to_transformers5_layout(twin_copy)
    assert any(k.startswith("model.language_model.") for k in keys)
    assert inspect_checkpoint(twin_copy).layout == "transformers5"
    r = export_medgemma(
        twin_copy, bundle=tmp_path / "b5", quants="F32", mmproj="f16", outtype="f32", fidelity=False
    )
    facts = r.files[0]["gguf"]
    assert (facts["architecture"], facts["tensors"], facts["vocab"]) == ("gemma3", 80, 1088)
    assert facts["tensor_types"] == {"f32": 80}
    for name in ("text-F32.gguf", "mmproj-f16.gguf"):
        a = {
            t.name: np.asarray(t.data)
            for t in gguf.GGUFReader(str(tmp_path / "b5" / "medgemma" / name)).tensors
        }
        b = {
            t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(gguf_bundle / "medgemma" / name)).tensors
        }
        assert a.keys() == b.keys(), name
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}:{k}")
