"""Loading MedGemma, step by step: which files of the bundle (verified), whether they fit in memory,
the llama.cpp text model, and the image encoder. :class:`edge.medgemma.model.MedGemma` runs these
steps in order; the llama-cpp-python specifics are in :mod:`edge.medgemma.llama_binding`."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from edge import settings as edge_settings
from edge.bundle.manifest import Bundle
from edge.device import accel, resources
from edge.errors import InputError, ResourceError, UsageError
from edge.medgemma import llama_binding
from edge.medgemma.settings import MedGemmaSettings
from edge.medgemma.vision import MmprojImageEncoder, OnnxImageEncoder

log = logging.getLogger("edge.medgemma.model")


def resolve_settings(settings: MedGemmaSettings | None, overrides: dict[str, Any]) -> MedGemmaSettings:
    """``settings`` (default: the defaults) with the non-None ``overrides`` applied, each checked.

    Raises:
        UsageError: ``settings`` is not a MedGemmaSettings, or an override is unknown or bad.
    """
    if settings is None:
        settings = MedGemmaSettings()
    elif not isinstance(settings, MedGemmaSettings):
        raise UsageError(f"MedGemma's settings must be a MedGemmaSettings, not {type(settings).__name__}")
    return edge_settings.overrides(settings, **overrides)


def choose_files(bundle: Bundle, comp: dict, settings: MedGemmaSettings) -> tuple[dict, dict | None]:
    """The manifest entries of the text model and the image encoder (None: no images), verified.

    Raises:
        InputError / IntegrityError: a file is missing or does not match the manifest.
    """
    s = settings
    text_entry = bundle.file("medgemma", "text", **({"quant": s.quant} if s.quant else {}))
    encoder_entry = choose_encoder(bundle, comp, s.image_encoder, s.mmproj_type) if s.vision else None
    wanted = {text_entry["path"]} | ({encoder_entry["path"]} if encoder_entry else set())
    bundle.verify(component="medgemma", paths=wanted).raise_for_failure()
    return text_entry, encoder_entry


def choose_encoder(bundle: Bundle, comp: dict, choice: str, mmproj_type: str | None = None) -> dict | None:
    """The manifest entry of the image encoder to load (None: the bundle has none)."""
    if choice not in ("auto", "mmproj", "onnx"):
        raise UsageError(f"unknown image encoder {choice!r} (auto, mmproj or onnx)")
    onnx = sorted(
        (f for f in comp["files"] if f["role"] == "vision-onnx"), key=lambda f: f.get("precision") != "int8"
    )
    mmproj = sorted(
        (f for f in comp["files"] if f["role"] == "mmproj"), key=lambda f: f.get("quant") != mmproj_type
    )
    if choice == "onnx" and not onnx:
        raise InputError(f"bundle {bundle.root} has no ONNX image encoder (medgemma/vision-*.onnx)")
    if choice == "mmproj" and not mmproj:
        raise InputError(f"bundle {bundle.root} has no vision projector (medgemma/mmproj-*.gguf)")
    if choice == "auto" and onnx and mmproj and not importlib.util.find_spec("onnxruntime"):
        log.info("onnxruntime is not installed: images go through %s", mmproj[0]["path"])
        onnx = []
    ordered = mmproj + onnx if choice == "mmproj" else onnx + mmproj
    return ordered[0] if ordered else None


def image_patches(comp: dict, encoder_entry: dict | None) -> int:
    """Patches the vision tower sees per image (896 px / 14 px → 4096 for MedGemma)."""
    size = (encoder_entry or {}).get("preprocess", {}).get("height") or comp.get("model", {}).get(
        "image_size", 896
    )
    return (int(size) // 14) ** 2


def check_memory(
    bundle: Bundle,
    comp: dict,
    text_entry: dict,
    encoder_entry: dict | None,
    header,
    settings: MedGemmaSettings,
    *,
    encoder_runtime: str = "onnxruntime",
) -> resources.MemoryEstimate:
    """The memory the model needs with these settings (``encoder_entry`` run by
    ``encoder_runtime``: the file and runtime the image encoder's plan puts first).

    Raises:
        ResourceError: the estimate exceeds free memory (unless ``settings.check_memory`` is off).
    """
    s = settings
    estimate = resources.estimate(
        bundle.path(text_entry),
        header,
        encoder=bundle.path(encoder_entry) if encoder_entry else None,
        image_patches=image_patches(comp, encoder_entry),
        encoder_runtime=encoder_runtime,
        n_ctx=s.n_ctx,
        kv_type=s.kv_type,
        repack=llama_binding.effective_repack(s.repack),
        swa_full=s.swa_full,
        n_batch=s.n_batch,
    )
    if s.check_memory:
        # every layer offloaded to a GPU: the weights and the KV cache live in its memory, not RAM
        gpu = resources.gpu_memory() if s.gpu_layers == -1 else 0
        free = gpu or resources.available_memory()
        if estimate.total > free:
            raise ResourceError(
                f"this device has {free / 2**30:.2f} GiB {'of GPU memory' if gpu else 'free'} but "
                f"{text_entry['path']} at context {s.n_ctx} needs about {estimate.describe()}; use a "
                f"smaller quantization, --ctx or a smaller --profile"
            )
    return estimate


def load_text_model(path: Path, header, settings: MedGemmaSettings) -> tuple[Any, int, int]:
    """The GGUF loaded into llama.cpp. Returns (the ``llama_cpp.Llama``, the context length it
    has, the threads it uses); the context is capped at the model's training length."""
    s = settings
    n_ctx_train = int(header.arch_key("context_length", s.n_ctx) or s.n_ctx)
    n_threads = s.n_threads or os.cpu_count() or 1
    llama_binding.quiet_native_logs(verbose=log.isEnabledFor(logging.DEBUG))
    accel.load_backends()
    llama = llama_binding.load_llama(
        path,
        repack=s.repack,
        n_ctx=min(s.n_ctx, n_ctx_train),
        n_batch=s.n_batch,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        flash_attn=s.flash_attn,
        use_mmap=s.use_mmap,
        seed=s.seed,
        type_k=s.ggml_kv_type,
        type_v=s.ggml_kv_type,
        swa_full=s.swa_full,
        n_gpu_layers=accel.llama_gpu_layers(s.gpu_layers),
        verbose=log.isEnabledFor(logging.DEBUG),
    )
    n_ctx = min(s.n_ctx, n_ctx_train, llama.n_ctx())  # llama.cpp may pad its own upwards
    return llama, n_ctx, n_threads


def plan_onnx_encoder(
    bundle: Bundle, entry: dict | None, settings: MedGemmaSettings, *, low_memory: bool | None = None
) -> OnnxImageEncoder | None:
    """The ONNX image encoder of ``entry``, its engine plan decided and nothing opened yet (so the
    memory check can count the file and runtime it will use); None for an mmproj or no encoder."""
    if entry is None or entry["role"] != "vision-onnx":
        return None
    s = settings
    return OnnxImageEncoder(
        bundle.path(entry),
        entry,
        threads=s.n_threads or os.cpu_count() or 1,
        gpu=s.image_gpu,
        keep=s.keep_encoder,
        engine=s.image_engine,
        bundle=bundle,
        low_memory=low_memory,
    )


def check_memory_with_encoder(
    bundle: Bundle,
    comp: dict,
    text_entry: dict,
    encoder_entry: dict | None,
    header,
    settings: MedGemmaSettings,
) -> tuple[resources.MemoryEstimate, OnnxImageEncoder | None]:
    """:func:`check_memory` for the image encoder's plan; when the plan's first engine holds fp32
    weights and does not fit, the plan with int8 files first (one log line) before refusing."""
    planned = plan_onnx_encoder(bundle, encoder_entry, settings)

    def check(p):
        entry = p.entry if p else encoder_entry
        runtime = p.plan[0][0].runtime if p else "onnxruntime"
        return check_memory(bundle, comp, text_entry, entry, header, settings, encoder_runtime=runtime)

    try:
        return check(planned), planned
    except ResourceError:
        if planned is None or planned.low_memory or planned.plan[0][0].precision != "fp32":
            raise
        lighter = plan_onnx_encoder(bundle, encoder_entry, settings, low_memory=True)
        estimate = check(lighter)
        log.info(
            "image encoder: %s would not fit beside the model here; using %s",
            planned.plan[0][0].name,
            lighter.plan[0][0].name,
        )
        return estimate, lighter


def load_image_encoder(
    bundle: Bundle,
    entry: dict | None,
    settings: MedGemmaSettings,
    *,
    llama,
    threads: int,
    planned: OnnxImageEncoder | None = None,
) -> OnnxImageEncoder | MmprojImageEncoder | None:
    """The image encoder of ``entry`` (the ONNX graph — ``planned`` when given —, or the mmproj
    over ``llama``'s model); None without one."""
    if entry is None:
        return None
    s, path = settings, bundle.path(entry)
    if entry["role"] == "vision-onnx":
        return planned or plan_onnx_encoder(bundle, entry, settings)
    return MmprojImageEncoder(
        path, entry, llama.model, threads=threads, flash_attn=s.flash_attn, gpu=s.gpu_layers != 0
    )


def describe(bundle: Bundle, comp: dict, text_entry: dict, encoder_entry: dict | None, n_ctx: int) -> dict:
    """What was loaded, as ``MedGemma.info`` and every answer's ``model`` report it."""
    source = comp.get("source", {})
    return {
        "bundle": str(bundle.root),
        "text": text_entry["path"],
        "quant": text_entry.get("quant"),
        "image_encoder": encoder_entry["path"] if encoder_entry else None,
        "n_ctx": n_ctx,
        "source": source.get("description") or source.get("model_id"),
        "synthetic": bool(source.get("synthetic")),
    }
