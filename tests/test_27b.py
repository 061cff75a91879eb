"""MedGemma 27B: registry entries, the 27B-shaped twins' export, the size estimate, the auto-pick."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from fixtures_gguf import edit_config

from edge.bundle import registry
from edge.bundle.gguf_header import read_header, tensor_bytes
from edge.bundle.manifest import open_bundle
from edge.device import profiles
from edge.errors import InputError
from export.gguf import sizes
from export.gguf.checkpoint import (
    check_llama_cpp_support,
    inspect_checkpoint,
    layer_types,
    llama_cpp_attention_scalar,
    llama_cpp_layer_types,
)
from export.twin import build_twin

GIB = 2**30
LARGE = {"workstation-32GB", "gpu-24GB", "jetson-agx-orin-64GB"}
MID_QUANTS = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"]


@pytest.fixture(scope="module")
def twin_27b(tmp_path_factory):
    return build_twin("medgemma", size="tiny-27b", out=tmp_path_factory.mktemp("t27") / "twin", seed=0).path


@pytest.fixture(scope="module")
def export_27b(tmp_path_factory, twin_27b):
    """The tiny-27b twin exported (F32 text, mmproj f16) with its fidelity against transformers."""
    from export.gguf.convert import export_medgemma

    root = tmp_path_factory.mktemp("t27") / "bundle"
    return export_medgemma(twin_27b, bundle=root, quants="F32", mmproj="f16", outtype="f32", threads=2)


@pytest.fixture(scope="module")
def mid_27b(tmp_path_factory):
    """The mid-27b twin (62 layers, rows of 256) and its bundle quantized to MID_QUANTS."""
    from export.gguf.convert import export_medgemma

    d = tmp_path_factory.mktemp("m27")
    src = build_twin("medgemma", size="mid-27b", out=d / "twin", seed=0).path
    export_medgemma(
        src,
        bundle=d / "bundle",
        quants=",".join(MID_QUANTS),
        mmproj="f16,q8_0",
        outtype="f16",
        fidelity=False,
        threads=2,
    )
    return src, d / "bundle"


# --- registry ---------------------------------------------------------------------------------------


def _config(spec):
    if "text_config" in spec.config:
        return transformers.Gemma3Config(**spec.config), transformers.Gemma3ForConditionalGeneration
    return transformers.Gemma3TextConfig(**spec.config), transformers.Gemma3ForCausalLM


@pytest.mark.parametrize(
    "model_id, params", [("medgemma-27b-it", (27.3e9, 27.6e9)), ("medgemma-27b-text-it", (26.9e9, 27.1e9))]
)
def test_registry_27b_numbers_are_transformers_config(model_id, params):
    spec = registry.get(model_id)
    cfg, cls = _config(spec)
    multimodal = "text_config" in spec.config
    t = cfg.text_config if multimodal else cfg
    raw_text = spec.config["text_config"] if multimodal else spec.config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (
        5376,
        62,
        32,
        16,
    )
    assert (t.head_dim, t.intermediate_size, t.sliding_window) == (128, 21504, 1024)
    assert t.query_pre_attn_scalar == 168 == t.hidden_size // t.num_attention_heads != t.head_dim
    assert t.layer_types == llama_cpp_layer_types(62) == layer_types(raw_text)  # 5 local : 1 global
    assert t.layer_types.count("full_attention") == 10
    four = registry.get("medgemma-4b-it").config
    for key in ("rope_theta", "rope_local_base_freq", "rope_scaling", "rms_norm_eps", "hidden_activation"):
        assert raw_text[key] == four["text_config"][key], key
    for key, value in raw_text.items():
        assert getattr(t, key) == value or key in ("torch_dtype", "sliding_window_pattern"), key
    if multimodal:
        assert spec.config["vision_config"] == four["vision_config"]  # the same SigLIP tower
        assert cfg.mm_tokens_per_image == 256 == spec.preprocessor["image_seq_length"]
        assert spec.preprocessor == registry.get("medgemma-4b-it").preprocessor
        for key, value in spec.config["vision_config"].items():
            assert getattr(cfg.vision_config, key) == value or key == "torch_dtype", key
        assert t.vocab_size == 262208
    else:
        assert spec.architecture == "Gemma3ForCausalLM" and t.vocab_size == 262144
    assert llama_cpp_attention_scalar(raw_text)[0] == 168
    check_llama_cpp_support(spec.config)  # llama.cpp's 27B type computes this model's scale
    with torch.device("meta"):
        model = cls(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert params[0] < n < params[1]
    assert set(spec.profiles) == LARGE


def test_llama_cpp_attention_scale_follows_the_model_type():
    # 62 layers: llama.cpp's 27B type, 1/sqrt(n_embd / n_head) in integer division
    assert (
        llama_cpp_attention_scalar({"num_hidden_layers": 62, "hidden_size": 5376, "num_attention_heads": 32})[
            0
        ]
        == 168
    )
    assert (
        llama_cpp_attention_scalar({"num_hidden_layers": 62, "hidden_size": 130, "num_attention_heads": 4})[0]
        == 32
    )
    # any other layer count (4B's 34, 12B's 48, an unknown 61): 1/sqrt(head_dim)
    for n in (6, 34, 48, 61):
        text = {"num_hidden_layers": n, "hidden_size": 5376, "num_attention_heads": 32, "head_dim": 128}
        assert llama_cpp_attention_scalar(text)[0] == 128, n


# --- the 27B-shaped twin's export -------------------------------------------------------------------


def test_tiny_27b_twin_is_27b_shaped(twin_27b):
    cfg = transformers.Gemma3Config.from_pretrained(twin_27b)
    t = cfg.text_config
    assert t.num_hidden_layers == 62 and t.layer_types == llama_cpp_layer_types(62)
    assert t.query_pre_attn_scalar == t.hidden_size // t.num_attention_heads != t.head_dim
    assert t.num_attention_heads // t.num_key_value_heads == 2 and t.intermediate_size == 4 * t.hidden_size
    info = json.loads((twin_27b / "config.json").read_text())["medgemma_edge_twin"]
    assert info["model"] == "medgemma-27b-it" and info["size"] == "tiny-27b"


def test_tiny_27b_gguf_matches_transformers(export_27b):
    fid = export_27b.fidelity
    f32 = fid["text"]["F32"]
    assert f32["positions"] == fid["prompts"]["text_tokens"] > 40
    assert f32["top1"] == 1.0
    assert f32["max_abs"] < 1e-2 and f32["kl"] < 1e-5  # measured 7e-3 and 6e-7
    img = f32["image_prompt"]
    assert img["tokens_match"] and img["top1"] == 1.0 and img["max_abs"] < 1e-2
    assert fid["mmproj"]["f16"]["cosine"] > 0.9999
    b = open_bundle(export_27b.bundle)
    comp = b.component("medgemma")
    assert comp["model"]["n_layers"] == 62 and comp["source"]["model_id"] == "medgemma-27b-it"
    assert set(comp["profiles"]) == LARGE and profiles.model_family(b) == "27b"
    h = read_header(b.path(b.file("medgemma", "text", quant="F32")))
    assert (
        h.arch_key("block_count"),
        h.arch_key("embedding_length"),
        h.arch_key("attention.head_count"),
    ) == (
        62,
        128,
        4,
    )
    assert h.arch_key("attention.key_length") == 24  # head_dim, != 128 / 4: the 27B type's scale differs


def _wrong_scale(src, dst, scalar):
    shutil.copytree(src, dst)
    edit_config(dst, lambda c: c["text_config"].update(query_pre_attn_scalar=scalar))
    return dst


def test_27b_shaped_twin_with_a_scale_llama_cpp_gets_wrong_is_refused(twin_27b, tmp_path):
    from export.gguf.convert import export_medgemma

    wrong = _wrong_scale(twin_27b, tmp_path / "ckpt", 24)  # = head_dim, != hidden / heads
    why = "query_pre_attn_scalar is 24 but hidden_size / num_attention_heads is 32 .128 / 4.: a 62-layer"
    with pytest.raises(InputError, match=why + ".*1/sqrt.32.*not exportable"):
        inspect_checkpoint(wrong)
    with pytest.raises(InputError, match=why):
        export_medgemma(wrong, bundle=tmp_path / "bundle", quants="F32", outtype="f32", fidelity=False)
    assert not (tmp_path / "bundle").exists()


def test_6_layer_twin_with_scale_other_than_head_dim_is_refused(twin_copy):
    edit_config(twin_copy, lambda c: c["text_config"].update(query_pre_attn_scalar=16))
    with pytest.raises(
        InputError, match="is 16 but head_dim is 32: llama.cpp scales a 6-layer.*not exportable"
    ):
        inspect_checkpoint(twin_copy)


def test_the_refused_scale_really_answers_differently(export_27b, twin_27b, tmp_path):
    """The refusal is not caution: the GGUF llama.cpp runs (scale 1/sqrt(32), what a 62-layer
    Gemma 3 gets) is far from transformers running the same weights at 1/sqrt(24)."""
    from export.gguf.fidelity import Reference, compare_logits, llama_text_logits

    wrong = _wrong_scale(twin_27b, tmp_path / "ckpt", 24)
    ref = Reference(wrong)
    got = llama_text_logits(export_27b.bundle / "medgemma" / "text-F32.gguf", ref.text_ids, threads=2)
    v = got[0].shape[-1]
    row = compare_logits(
        np.concatenate([r[:, :v] for r in ref.text_logits]), np.concatenate([g[:, :v] for g in got])
    )
    matched = export_27b.fidelity["text"]["F32"]
    assert row["max_abs"] > 0.1 and row["max_abs"] > 20 * matched["max_abs"]  # measured 1.4 vs 7e-3
    assert row["kl"] > 100 * matched["kl"]


# --- sizes -------------------------------------------------------------------------------------------


def test_size_estimate_is_the_real_quantized_files_tensor_by_tensor(mid_27b):
    src, bundle = mid_27b
    cfg = json.loads((src / "config.json").read_text())
    for q in MID_QUANTS:
        path = bundle / "medgemma" / f"text-{q}.gguf"
        h = read_header(path)
        real = {name: (tuple(reversed(shape)), t) for name, (shape, t) in h.tensors.items()}
        est = sizes.text_gguf_layout(cfg, q, vocab=h.vocab_size)
        assert est == real, (
            q,
            {n: (real.get(n), est.get(n)) for n in set(real) | set(est) if real.get(n) != est.get(n)},
        )
        data = sum(tensor_bytes(shape, t) for shape, t in h.tensors.values())
        assert sizes.text_gguf_bytes(cfg, q, vocab=h.vocab_size) == data, q
        size = path.stat().st_size
        assert abs(sizes.text_gguf_file_bytes(cfg, q, vocab=h.vocab_size) - size) < 0.01 * size, q
    # the rows are 256 wide: Q4_K_M's K-quants are kept, Q6_K where use_more_bits says so
    types = {t for _s, t in read_header(bundle / "medgemma" / "text-Q4_K_M.gguf").tensors.values()}
    assert {sizes.Q4_K, sizes.Q6_K} <= types and sizes.Q5_0 not in types
    for m in ("f16", "q8_0"):
        h = read_header(bundle / "medgemma" / f"mmproj-{m}.gguf")
        assert sizes.mmproj_gguf_bytes(cfg, m) == sum(tensor_bytes(s, t) for s, t in h.tensors.values()), m


@pytest.mark.parametrize("model_id", ["medgemma-27b-it", "medgemma-27b-text-it"])
def test_registry_memory_table_is_the_estimate(model_id):
    spec = registry.get(model_id)
    table = spec.raw["memory"]
    iq = spec.raw["quantization"]["needs_imatrix"]
    for q, n in table["text_gguf_bytes"].items():
        assert sizes.text_gguf_file_bytes(spec.config, q, vocab=262144, imatrix=q in iq) == n, q
    assert 16.0e9 < table["text_gguf_bytes"]["Q4_K_M"] < 17.0e9  # llama.cpp's own 27B Q4_K_M: 16.5 GB
    multimodal = "text_config" in spec.config
    if multimodal:
        for m, n in table["mmproj_gguf_bytes"].items():
            assert sizes.mmproj_gguf_bytes(spec.config, m) == n, m
    for name, n in table["ram_bytes"].items():
        prof = {**profiles.all_profiles()[name], **spec.profiles[name]}
        est = sizes.memory_estimate(
            spec.config,
            prof["quant"][0],
            n_ctx=prof["n_ctx"],
            kv_type=prof["kv_type"],
            swa_full=prof["swa_full"],
            repack=prof["repack"],
            encoder=prof["image_encoder"] if multimodal else None,
            mmproj=prof["mmproj"],
            vocab=262144,
        )
        assert est.total == n, name
        assert n < 0.9 * (prof.get("vram_gib") or prof["ram_gib"]) * GIB, name  # the profile holds it
    # KV cache: 16 heads x (128 + 128) x 2 bytes = 8 KiB a token a layer; 10 global layers at 8192
    # tokens, 52 sliding ones at their 1024-token window
    h = sizes.text_header(spec.config, "Q4_K_M", vocab=262144)
    from edge.device.resources import kv_cache_bytes

    assert kv_cache_bytes(h, 8192, "f16", swa_full=False) == (10 * 8192 + 52 * 1024) * 8192


# --- which model this device runs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_bundles(export_27b, twin_llm_bundle):
    b27, b4 = open_bundle(export_27b.bundle), open_bundle(twin_llm_bundle)
    assert (profiles.model_family(b27), profiles.model_family(b4)) == ("27b", "4b")
    return b27, b4


@pytest.mark.parametrize(
    "machine, profile, family",
    [
        # a clinic workstation: 64 GB of RAM, no GPU
        (dict(memory=64 * GIB, available=60 * GIB, gpu_memory=0), "workstation-32GB", "27b"),
        # a 24 GB GPU in a 16 GB box: every layer on the GPU, so the GPU's memory is the budget
        (dict(memory=16 * GIB, available=12 * GIB, gpu_memory=24 * GIB), "gpu-24GB", "27b"),
        # the Jetson AGX Orin 64 GB (shared memory: its RAM is the budget)
        (dict(memory=61 * GIB, available=58 * GIB, gpu_memory=0, jetson=True), "jetson-agx-orin-64GB", "27b"),
        # a 16 GB laptop, a phone, a Jetson Orin Nano: no 27B profile's class, 4B
        (dict(memory=15.5 * GIB, available=12 * GIB, gpu_memory=0), "laptop-16GB", "4b"),
        (dict(memory=7.6 * GIB, available=5 * GIB, gpu_memory=0, android=True), "phone-8GB", "4b"),
        (dict(memory=7.4 * GIB, available=6 * GIB, gpu_memory=0, jetson=True), "jetson-orin-nano-8GB", "4b"),
    ],
)
def test_pick_prefers_27b_on_machines_of_its_class(two_bundles, machine, profile, family):
    machine = {"jetson": False, "android": False, **machine}
    machine["memory"] = int(machine["memory"])
    for order in (two_bundles, two_bundles[::-1]):
        pick = profiles.pick_bundle(list(order), **machine)
        assert (pick.profile, pick.family) == (profile, family), pick.reason
        assert pick.bundle is two_bundles[0 if family == "27b" else 1]
        assert pick.need_bytes <= pick.budget_bytes


def test_pick_takes_4b_when_27b_does_not_fit(two_bundles):
    b27, b4 = two_bundles
    need, on_gpu = profiles.need_bytes(b27, "workstation-32GB")
    assert not on_gpu and need > 0
    machine = dict(memory=32 * GIB, gpu_memory=0, jetson=False, android=False)
    pick = profiles.pick_bundle([b27, b4], available=need - 1, **machine)
    assert pick.bundle is b4 and pick.profile == "laptop-16GB" and pick.need_bytes <= pick.budget_bytes
    assert "27b under workstation-32GB needs" in pick.reason
    assert profiles.pick_bundle([b27, b4], available=need, **machine).bundle is b27
    # on the GPU profile the GPU's memory is the budget: a 24 GB GPU runs it with 1 byte of RAM free
    need_gpu, on_gpu = profiles.need_bytes(b27, "gpu-24GB")
    assert on_gpu and need_gpu < 24 * GIB
    gpu = dict(memory=16 * GIB, available=1, jetson=False, android=False)
    pick = profiles.pick_bundle([b4, b27], gpu_memory=24 * GIB, **gpu)
    assert (pick.bundle, pick.profile, pick.budget_bytes) == (b27, "gpu-24GB", 24 * GIB)


def test_auto_profile_of_a_27b_bundle(two_bundles, monkeypatch):
    from edge.device import resources

    b27, b4 = two_bundles
    monkeypatch.setattr(profiles, "_is_jetson", lambda: False)
    monkeypatch.setattr(profiles, "_is_android", lambda: False)
    monkeypatch.setattr(profiles, "total_memory", lambda: 64 * GIB)
    monkeypatch.setattr(resources, "gpu_memory", lambda: 0)
    name, s = profiles.medgemma_settings(b27)
    assert name == "workstation-32GB"
    assert (s.n_ctx, s.repack, s.swa_full, s.gpu_layers) == (8192, False, False, 0)
    assert s.quant == "F32"  # none of Q4_K_M/IQ4_XS/Q4_0 in this bundle: what it has
    assert profiles.medgemma_settings(b4)[0] == "laptop-16GB"  # the same machine, a 4B bundle
    monkeypatch.setattr(resources, "gpu_memory", lambda: 24 * GIB)
    name, s = profiles.medgemma_settings(b27)
    assert name == "gpu-24GB" and s.gpu_layers == -1 and s.image_gpu is True
    assert profiles.medgemma_settings(b27, "laptop-8GB")[0] == "laptop-8GB"  # a named profile wins


def test_a_62_layer_checkpoint_without_model_is_exported_as_27b():
    from export.gguf.convert import default_model

    assert default_model(registry.get("medgemma-27b-it").config["text_config"]) == "medgemma-27b-it"
    assert default_model(registry.get("medgemma-4b-it").config["text_config"]) == "medgemma-4b-it"
    assert default_model({}) == "medgemma-4b-it"


def test_a_full_offload_is_checked_against_the_gpus_memory(monkeypatch):
    from edge.device import resources
    from edge.errors import ResourceError
    from edge.medgemma import loading
    from edge.medgemma.settings import MedGemmaSettings

    class Est:
        total = 20 * 2**30

        def describe(self):
            return "20 GiB"

    class Bundle:
        def path(self, entry):
            return entry["path"]

    monkeypatch.setattr(resources, "estimate", lambda *a, **k: Est())
    monkeypatch.setattr(loading, "image_patches", lambda *a: 0)
    monkeypatch.setattr(resources, "available_memory", lambda: 16 * 2**30)  # gpu-24GB's RAM
    monkeypatch.setattr(resources, "gpu_memory", lambda: 24 * 2**30)
    args = (Bundle(), {}, {"path": "text-Q4_K_M.gguf"}, None, None)
    assert loading.check_memory(*args, MedGemmaSettings(gpu_layers=-1)).total == Est.total
    with pytest.raises(ResourceError, match="16.00 GiB free"):  # on the CPU it must fit in RAM
        loading.check_memory(*args, MedGemmaSettings(gpu_layers=0))
    monkeypatch.setattr(resources, "gpu_memory", lambda: 0)  # no GPU seen: RAM again
    with pytest.raises(ResourceError, match="16.00 GiB free"):
        loading.check_memory(*args, MedGemmaSettings(gpu_layers=-1))
    monkeypatch.setattr(resources, "gpu_memory", lambda: 12 * 2**30)
    with pytest.raises(ResourceError, match="12.00 GiB of GPU memory"):
        loading.check_memory(*args, MedGemmaSettings(gpu_layers=-1))
