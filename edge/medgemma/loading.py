"""Loading MedGemma's pieces: which image encoder, the llama.cpp model with its weight-repacking
switch, and libmtmd's logs. Helpers of :class:`edge.llm.MedGemma`, kept apart from the
generation code."""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import threading
from pathlib import Path

from edge.bundle.manifest import Bundle
from edge.errors import InputError, UsageError

log = logging.getLogger("edge.medgemma.model")
_PARAMS_LOCK = threading.Lock()


def quiet_native_logs() -> None:
    """Route libmtmd's logs through llama-cpp-python's logger (silent unless verbose)."""
    import llama_cpp._logger as llog
    import llama_cpp.mtmd_cpp as mtmd

    for setter in (mtmd.mtmd_log_set, mtmd.mtmd_helper_log_set):
        setter(llog.llama_log_callback, ctypes.c_void_p(0))
    llog.set_verbose(log.isEnabledFor(logging.DEBUG))


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


def load_llama(path: Path, *, repack: bool, **kwargs):
    """llama_cpp.Llama, with llama.cpp's weight repacking switched as asked (the binding has no
    argument for ``use_extra_bufts``, so its default model params are wrapped while it loads)."""
    import llama_cpp.llama_cpp as lc
    from llama_cpp import Llama

    with _PARAMS_LOCK:
        default = lc.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = repack
            return p

        lc.llama_model_default_params = params
        try:
            return Llama(model_path=str(path), **kwargs)
        finally:
            lc.llama_model_default_params = default
