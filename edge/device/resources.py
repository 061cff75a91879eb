"""What the device can hold: available memory, and what a model + context will need.

Checked *before* loading, so a device that can't hold a bundle gets a clear refusal (exit 4)
instead of being killed by the OOM killer halfway through a load.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from edge.bundle.gguf_header import GGUFHeader
from edge.errors import UsageError

_KV_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


BUDGET_ENV = "MEDGEMMA_EDGE_MEMORY_BUDGET"  # e.g. "3.5G": never plan to use more than this


def parse_bytes(text: str) -> int:
    """'3.5G', '512M', '1024' -> bytes (binary units).

    Raises:
        UsageError: not a finite, non-negative size.
    """
    clean = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(clean[-1:], 1)
    try:
        value = float(clean[:-1] if scale > 1 else clean)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"{text!r} is not a size (e.g. 512M, 3.5G, 1048576)")
    return int(value * scale)


def available_memory() -> int:
    """Bytes this process may still use: MemAvailable, capped by a cgroup limit and by
    $MEDGEMMA_EDGE_MEMORY_BUDGET when those are lower."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(path).read_text().strip()
            if raw.isdigit():
                used = int(
                    Path(path.replace("max", "current").replace("limit_in_bytes", "usage_in_bytes"))
                    .read_text()
                    .strip()
                )
                avail = min(avail, int(raw) - used)
        except OSError:
            continue
    if budget := os.environ.get(BUDGET_ENV):
        avail = min(avail, parse_bytes(budget))
    return avail


_GPU_MEMORY: list[int] = []  # the one probe's answer, per process


def gpu_memory() -> int:
    """Bytes of memory of this machine's largest NVIDIA GPU that llama.cpp can offload to; 0 when
    the llama.cpp build has no GPU backend or ``nvidia-smi`` shows none (a Jetson shares its RAM:
    :func:`edge.device.profiles.detect` sizes it by RAM). Probed once per process; local only."""
    if _GPU_MEMORY:
        return _GPU_MEMORY[0]
    found = 0
    try:
        import llama_cpp

        offload = bool(llama_cpp.llama_supports_gpu_offload())
    except (ImportError, AttributeError, OSError):
        offload = False
    smi = shutil.which("nvidia-smi") if offload else None
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout
            found = max((int(x) for x in out.split() if x.isdigit()), default=0) * 2**20  # MiB
        except (OSError, subprocess.SubprocessError):
            found = 0
    _GPU_MEMORY.append(found)
    return found


@dataclass
class MemoryEstimate:
    weights: int
    kv_cache: int
    projector: int  # the image encoder (mmproj or ONNX graph) and its compute buffers
    overhead: int
    repacked: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.repacked + self.kv_cache + self.projector + self.overhead

    def describe(self) -> str:
        gib = 2**30
        repacked = f" + repacked copy {self.repacked / gib:.2f}" if self.repacked else ""
        return (
            f"{self.total / gib:.2f} GiB (weights {self.weights / gib:.2f}{repacked} + KV cache "
            f"{self.kv_cache / gib:.2f} + image encoder {self.projector / gib:.2f} + buffers {self.overhead / gib:.2f})"
        )


# ggml types llama.cpp's CPU backend keeps a second, repacked copy of (for its faster matmul
# kernels), per architecture (ggml-cpu/repack.cpp): Q4_0, Q2_K, Q4_K, IQ4_NL, MXFP4 with AVX2 on
# x86; also Q5_K, Q6_K and Q8_0 on ARM with dotprod/i8mm (phones, Jetson).
_REPACKED_TYPES = {
    "x86_64": {2, 10, 12, 20, 39},
    "aarch64": {2, 8, 10, 12, 13, 14, 20, 39},
}


def repacked_bytes(header: GGUFHeader, machine: str | None = None) -> int:
    """Bytes of the repacked weight copy: matmul weights (not the token embeddings, which are
    looked up by row) of a type the CPU backend repacks on ``machine``."""
    import platform

    from edge.bundle.gguf_header import tensor_bytes

    kinds = _REPACKED_TYPES.get(machine or platform.machine(), set())
    return sum(
        tensor_bytes(shape, ttype)
        for name, (shape, ttype) in header.tensors.items()
        if ttype in kinds and len(shape) == 2 and not name.startswith("token_embd")
    )


def kv_cache_bytes(header: GGUFHeader, n_ctx: int, kv_type: str = "f16", swa_full: bool = True) -> int:
    """K and V for every layer at ``n_ctx`` (sliding-window layers hold only their window
    unless ``swa_full``)."""
    n_layer = int(header.arch_key("block_count", 0))
    n_kv_heads = header.arch_key("attention.head_count_kv", 0)
    n_kv_heads = max(n_kv_heads) if isinstance(n_kv_heads, list) else int(n_kv_heads)
    k_len = int(header.arch_key("attention.key_length", 0) or 0)
    v_len = int(header.arch_key("attention.value_length", 0) or k_len)
    if not k_len:
        n_embd, n_head = (
            int(header.arch_key("embedding_length", 0)),
            int(header.arch_key("attention.head_count", 1)),
        )
        k_len = v_len = n_embd // max(n_head, 1)
    window = int(header.arch_key("attention.sliding_window", 0) or 0)
    per_token_layer = n_kv_heads * (k_len + v_len) * _KV_BYTES.get(kv_type, 2.0)
    if window and not swa_full and header.architecture.startswith("gemma3"):
        n_global = n_layer // 6
        cells = n_global * n_ctx + (n_layer - n_global) * min(n_ctx, window)
    else:
        cells = n_layer * n_ctx
    return int(cells * per_token_layer)


# Activation memory of one image through the vision tower, in rows of [patches × hidden] floats,
# measured on the full-size twin (896 px: 4096 patches × 1152) in its own process: the ONNX
# int8 graph with flash attention adds 0.69 GB over its file (36 rows), llama.cpp's mmproj with
# flash attention 0.18 GB (10 rows). See benchmarks/bench_profiles.py, "image encoders alone".
_ENCODER_ROWS = {"onnx": 36, "mmproj": 10}
# OpenVINO keeps the graph it read beside the compiled one (bf16 weights for the bf16 hint): the
# fp32 graph on ov-bf16 peaked at 3.40 GiB alone for a 1.68 GB file (benchmarks/bench_encoders.py,
# full-size twin, AMX Xeon), i.e. ~1.7x the file besides the activations; onnxruntime maps 1x.
_WEIGHT_COPIES = {"onnxruntime": 1.0, "openvino": 1.7}


def encoder_bytes(
    path: Path, *, patches: int = 4096, hidden: int = 1152, runtime: str = "onnxruntime"
) -> int:
    """Peak memory of an image encoder while it encodes one image: its file (weights, as many
    copies as ``runtime`` holds) plus activations (see _ENCODER_ROWS). An OpenVINO IR (.xml)
    counts its .bin."""
    kind = "mmproj" if path.suffix == ".gguf" else "onnx"
    size = path.stat().st_size
    if path.suffix == ".xml" and path.with_suffix(".bin").exists():
        size += path.with_suffix(".bin").stat().st_size
    size = int(size * _WEIGHT_COPIES.get(runtime, 1.0))
    return encoder_peak(size, kind, patches=patches, hidden=hidden)


def encoder_peak(file_bytes: int, kind: str, *, patches: int = 4096, hidden: int = 1152) -> int:
    """:func:`encoder_bytes` for an encoder file of ``file_bytes`` of ``kind`` (onnx, mmproj)."""
    return file_bytes + _ENCODER_ROWS[kind] * patches * hidden * 4


def estimate(
    text: Path,
    header: GGUFHeader,
    *,
    encoder: Path | None,
    n_ctx: int,
    kv_type: str = "f16",
    n_batch: int = 512,
    repack: bool = True,
    swa_full: bool = True,
    image_patches: int = 4096,
    encoder_runtime: str = "onnxruntime",
) -> MemoryEstimate:
    """Peak RSS estimate of a loaded model answering about an image.

    weights (mmapped, all touched) + the repacked copy (when on) + KV + the image encoder while it
    encodes (:func:`encoder_bytes`) + compute buffers (logits, ~12 activations of n_batch × n_embd
    floats) + the Python process with its libraries (~100 MiB). Checked against measured peak
    RSS on the full-size twin under every device profile by ``benchmarks/bench_profiles.py``.
    """
    return estimate_sizes(
        header,
        weights=text.stat().st_size,
        encoder=encoder_bytes(encoder, patches=image_patches, runtime=encoder_runtime)
        if encoder is not None
        else 0,
        n_ctx=n_ctx,
        kv_type=kv_type,
        n_batch=n_batch,
        repack=repack,
        swa_full=swa_full,
    )


def estimate_sizes(
    header: GGUFHeader,
    *,
    weights: int,
    encoder: int,
    n_ctx: int,
    kv_type: str = "f16",
    n_batch: int = 512,
    repack: bool = True,
    swa_full: bool = True,
    machine: str | None = None,
) -> MemoryEstimate:
    """:func:`estimate` from sizes instead of files: ``weights`` (the text file's bytes) and
    ``encoder`` (:func:`encoder_peak`), for a model that is not on this machine (the export's
    estimate of MedGemma 27B from a header built from its config)."""
    vocab = header.vocab_size or 0
    n_embd = int(header.arch_key("embedding_length", 0) or 0)
    overhead = 4 * 8 * vocab + 4 * 12 * n_batch * n_embd + (100 << 20)
    return MemoryEstimate(
        weights=weights,
        kv_cache=kv_cache_bytes(header, n_ctx, kv_type, swa_full=swa_full),
        projector=encoder,
        overhead=overhead,
        repacked=repacked_bytes(header, machine) if repack else 0,
    )
