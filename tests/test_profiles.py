"""Device profiles (models/profiles.toml, edge/device/profiles.py) and the memory estimate's terms."""

import pytest
from conftest import run_cli

from edge.bundle.gguf_header import read_header
from edge.bundle.manifest import open_bundle
from edge.device import profiles, resources
from edge.errors import UsageError

GIB = 2**30
KNOBS = {
    "quant",
    "image_encoder",
    "mmproj",
    "n_ctx",
    "kv_type",
    "flash_attn",
    "repack",
    "swa_full",
    "threads",
}


def test_every_profile_sets_every_knob():
    all_ = profiles.all_profiles()
    assert set(all_) == {
        "phone-4GB",
        "phone-8GB",
        "jetson-orin-nano-8GB",
        "laptop-8GB",
        "laptop-16GB",
        "workstation-32GB",
        "gpu-24GB",
        "jetson-agx-orin-64GB",
    }
    for name, prof in all_.items():
        assert KNOBS <= set(prof), (name, KNOBS - set(prof))
        assert prof["kv_type"] in ("f16", "q8_0", "q4_0", "f32")
    assert not all_["phone-4GB"]["repack"] and all_["laptop-8GB"]["repack"]


@pytest.mark.parametrize(
    "gib, jetson, android, expected",
    [
        (3.7, False, True, "phone-4GB"),
        (7.6, False, True, "phone-8GB"),
        (7.4, True, False, "jetson-orin-nano-8GB"),
        (7.7, False, False, "laptop-8GB"),
        (15.5, False, False, "laptop-16GB"),
        (64, False, False, "laptop-16GB"),
        (3.8, False, False, "phone-4GB"),
    ],
)
def test_detect(gib, jetson, android, expected):
    assert profiles.detect(int(gib * GIB), jetson=jetson, android=android, gpu_memory=0) == expected


@pytest.mark.parametrize(
    "gib, jetson, gpu_gib, family, expected",
    [
        (61.3, True, 0, "27b", "jetson-agx-orin-64GB"),  # AGX Orin 64 GB: for either model
        (61.3, True, 0, "4b", "jetson-agx-orin-64GB"),
        (7.4, True, 0, "27b", "jetson-orin-nano-8GB"),
        (31.2, False, 0, "27b", "workstation-32GB"),  # a 32 GB box shows ~31 GiB
        (64, False, 0, "27b", "workstation-32GB"),
        (15.5, False, 23.99, "27b", "gpu-24GB"),  # a 24 GB card shows 24564 MiB
        (64, False, 80, "27b", "gpu-24GB"),
        (15.5, False, 0, "27b", "laptop-16GB"),  # no 27B class: the load refuses a 27B (exit 4)
        (15.5, False, 12, "27b", "laptop-16GB"),
        (64, False, 24, "4b", "laptop-16GB"),  # a 4B bundle keeps the laptop profiles
    ],
)
def test_detect_for_the_27b_family(gib, jetson, gpu_gib, family, expected):
    got = profiles.detect(
        int(gib * GIB), jetson=jetson, android=False, gpu_memory=int(gpu_gib * GIB), family=family
    )
    assert got == expected


def test_large_profiles_fit_their_machines():
    all_ = profiles.all_profiles()
    for name in profiles.LARGE_PROFILES:
        prof = all_[name]
        assert not prof["repack"] and not prof["swa_full"] and prof["kv_type"] == "f16", name
        assert prof["quant"][0] in ("Q4_K_M", "Q5_K_M"), name
    assert all_["workstation-32GB"]["gpu_layers"] == 0 and not all_["workstation-32GB"]["image_gpu"]
    gpu = all_["gpu-24GB"]
    assert (
        gpu["gpu_layers"] == -1
        and gpu["image_gpu"]
        and gpu["image_encoder"] == "onnx"
        and gpu["vram_gib"] == 24
    )
    assert all_["jetson-agx-orin-64GB"]["gpu_layers"] == -1


def test_gpu_memory_reads_nvidia_smi_when_llama_cpp_offloads(tmp_path, monkeypatch):
    import llama_cpp

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 24564\necho 8192\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setattr(resources, "_GPU_MEMORY", [])
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    assert resources.gpu_memory() == 24564 * 2**20  # the largest GPU, MiB
    monkeypatch.setattr(resources, "_GPU_MEMORY", [])
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: False)
    assert resources.gpu_memory() == 0  # a CPU-only llama.cpp offloads nothing, whatever the GPU


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(UsageError, match="phone-4GB.*laptop-16GB"):
        profiles.get("watch-1GB")


def test_options_take_the_first_quant_the_bundle_has_and_flags_win(twin_llm_bundle):
    b = open_bundle(twin_llm_bundle)  # holds Q8_0 only
    name, opts = profiles.medgemma_settings(b, "phone-4GB")
    assert name == "phone-4GB" and opts.quant == "Q8_0"  # none of Q4_0/Q4_K_M: what there is
    assert opts.n_ctx == 2048 and opts.kv_type == "q8_0" and opts.repack is False
    assert opts.image_encoder == "mmproj"  # the profile prefers ONNX; this bundle has none
    _, opts = profiles.medgemma_settings(b, "laptop-16GB", n_ctx=512, kv_type=None)
    assert opts.n_ctx == 512 and opts.kv_type == "f16"  # None: the profile's


def test_ask_with_a_profile_and_a_bad_one(twin_llm_bundle):
    ok = run_cli(
        "ask", "hello", "-b", str(twin_llm_bundle), "--profile", "phone-4GB", "--max-tokens", "2", "--json"
    )
    assert ok.returncode == 0, ok.stderr
    bad = run_cli("ask", "hello", "-b", str(twin_llm_bundle), "--profile", "watch-1GB")
    assert bad.returncode == 2 and "unknown device profile" in bad.stderr


def test_repacked_copy_counts_the_types_the_cpu_repacks(twin_llm_bundle):
    b = open_bundle(twin_llm_bundle)
    header = read_header(b.path(b.file("medgemma", "text")))  # Q8_0 matmul weights
    assert resources.repacked_bytes(header, "x86_64") == 0  # x86 repacks Q4 types, not Q8_0
    arm = resources.repacked_bytes(header, "aarch64")
    q8 = sum(_q8_matmul_bytes(header))
    assert arm == q8 > 0


def _q8_matmul_bytes(header):
    from edge.bundle.gguf_header import tensor_bytes

    for name, (shape, ttype) in header.tensors.items():
        if ttype == 8 and len(shape) == 2 and not name.startswith("token_embd"):
            yield tensor_bytes(shape, ttype)


def test_sliding_window_cache_is_smaller_when_not_full(twin_llm_bundle):
    b = open_bundle(twin_llm_bundle)
    header = read_header(b.path(b.file("medgemma", "text")))
    window = int(header.arch_key("attention.sliding_window"))
    n_ctx = window * 4
    full = resources.kv_cache_bytes(header, n_ctx, "f16", swa_full=True)
    trimmed = resources.kv_cache_bytes(header, n_ctx, "f16", swa_full=False)
    assert trimmed < full


def test_medsiglip_precision_follows_the_profile_when_the_bundle_has_it(medsiglip_bundle):
    b = open_bundle(medsiglip_bundle)
    have = b.component("medsiglip")["precisions"]
    for name in profiles.all_profiles():
        opts = profiles.medsiglip_settings(b, name)
        assert opts.precision is None or opts.precision in have
    assert profiles.medsiglip_settings(b, "phone-4GB").precision == ("int8" if "int8" in have else None)


def test_a_setting_reaches_the_profile_the_flags_the_bridge_and_the_model(twin_llm_bundle):
    """One field of MedGemmaSettings (n_batch) is a profile key, a flag, a checked value and what
    llama.cpp gets; the bridge refuses it (not a client-settable field) with invalid_request."""
    from android_bridge.protocol import ProtocolError
    from android_bridge.runtime import Runtime
    from edge.medgemma.model import MedGemma
    from medgemma_edge.cli import build_parser

    b = open_bundle(twin_llm_bundle)
    assert profiles.medgemma_settings(b, "laptop-8GB")[1].n_batch == 512
    assert profiles.medgemma_settings(b, "laptop-8GB", n_batch=256)[1].n_batch == 256
    args = build_parser("ask").parse_args(["ask", "q", "--n-batch", "256"])
    assert args.n_batch == 256
    with pytest.raises(UsageError, match="n_batch must be at least 32"):
        profiles.medgemma_settings(b, "laptop-8GB", n_batch=8)
    with pytest.raises(ProtocolError, match="unknown load option for medgemma: n_batch"):
        Runtime(twin_llm_bundle).settings_for("medgemma", {"n_batch": 256})
    with MedGemma(b, n_ctx=256, n_batch=256, vision=False) as m:
        assert m.llama.n_batch == 256
