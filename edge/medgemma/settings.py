"""MedGemma's settings: every knob of loading and running the model, declared once.

A device profile produces a :class:`MedGemmaSettings` (:func:`edge.device.profiles.medgemma_settings`),
the CLI generates its flags from the fields (``medgemma_edge.options``), the bridge's ``load`` op
validates its options against them (the fields marked ``remote``), and
``MedGemma(bundle, settings)`` takes them. See :mod:`edge.settings`.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge.settings import check, setting

KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "q4_0": 2}  # ggml type ids
IMAGE_ENCODERS = ("auto", "onnx", "mmproj")
# edge.device.encoders.ENGINES, by name (tests/test_static_encoders.py keeps the two in step)
IMAGE_ENGINES = ("auto", "ort-fp32", "ort-int8", "ort-int8-static", "ov-fp32", "ov-bf16", "ov-int8")


@dataclass(frozen=True)
class MedGemmaSettings:
    """How to load and run MedGemma on this device (defaults suit a laptop CPU)."""

    quant: str | None = setting(None, "which text model of the bundle (e.g. Q4_K_M)")
    n_ctx: int = setting(
        4096,
        "context length in tokens (a longer prompt is refused)",
        flag="--ctx",
        minimum=16,
        maximum=131072,
    )
    n_threads: int | None = setting(
        None, "CPU threads (0: all cores)", flag="--threads", profile="threads", minimum=0, maximum=1024
    )
    kv_type: str = setting("f16", "KV cache type", choices=tuple(KV_TYPES))
    n_batch: int = setting(
        512,
        "prompt tokens evaluated per batch (an image's tokens go in one batch: keep it at least 256)",
        minimum=32,
        maximum=8192,
        remote=False,
    )
    flash_attn: bool = setting(True, "flash attention (1.7x faster image encoding on a 2-core CPU)")
    use_mmap: bool = setting(
        True, "map the weights instead of reading them into RAM", flag="--no-mmap", remote=False
    )
    repack: bool = setting(
        True, "a repacked copy of Q4 weights for faster x86 kernels (~1.5 GB more for 4B)", remote=False
    )
    swa_full: bool = setting(
        True,
        "a full-size sliding-window cache, so any earlier turn can be reused (more memory)",
        remote=False,
    )
    gpu_layers: int = setting(
        0, "layers to offload to a GPU (-1 all; needs a GPU build)", minimum=-1, maximum=1000, remote=False
    )
    image_encoder: str = setting(
        "auto",
        "onnx: the bundle's ONNX image encoder (faster, no mmproj in memory); mmproj: llama.cpp's "
        "projector; auto: onnx when the bundle has it",
        choices=IMAGE_ENCODERS,
        remote=False,
    )
    image_engine: str = setting(
        "auto",
        "which engine runs the ONNX image encoder (ort-int8, ort-int8-static, ov-bf16, ...); auto: "
        "the fastest one this device recorded (bench --quick) that meets the fidelity bar, else by CPU class",
        choices=IMAGE_ENGINES,
        remote=False,
    )
    image_gpu: bool = setting(
        False, "run the ONNX image encoder with CUDA when onnxruntime can", cli=False, remote=False
    )
    mmproj_type: str | None = setting(
        None,
        "which mmproj (f16, q8_0) when the bundle has several",
        cli=False,
        remote=False,
        profile="mmproj",
    )
    keep_encoder: bool = setting(
        True,
        "keep the ONNX image encoder open between images (off: its memory is given back)",
        cli=False,
        remote=False,
    )
    vision: bool = setting(True, "load an image encoder when the bundle has one", cli=False, remote=False)
    check_memory: bool = setting(
        True, "refuse to load when the memory estimate exceeds free memory", cli=False, remote=False
    )
    seed: int = setting(
        0, "llama.cpp's context seed (sampling seeds are per request)", cli=False, remote=False, minimum=0
    )

    def __post_init__(self) -> None:
        check(self)

    @property
    def ggml_kv_type(self) -> int:
        """The KV cache type as ggml's type id."""
        return KV_TYPES[self.kv_type]
