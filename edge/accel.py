"""Where the work runs: CPU threads, or a GPU when the device has one and the build can use it.

A device profile (``models/profiles.toml``) asks for GPU offload; what this process can actually
do depends on the wheels installed: llama.cpp offloads layers only if it was built with a GPU
backend (CUDA on a Jetson or a laptop), and onnxruntime runs on the GPU only with the
``onnxruntime-gpu`` wheel. Asking for a GPU the build can't use is not an error: it falls back
to the CPU with one clear log line, so the same profile works on every build.

A portable llama.cpp build (``-DGGML_BACKEND_DL=ON``, see docs/BUILDING.md) keeps each CPU
variant in its own ``libggml-cpu-*.so`` and loads none until asked: :func:`load_backends` does
that once, before the first model, and is a no-op for the default (native) build.
"""

from __future__ import annotations

import ctypes
import logging
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)


@cache
def load_backends() -> int:
    """Load dynamically built ggml backends (portable builds); returns how many are registered."""
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).resolve().parent / "lib"
    variants = sorted(lib_dir.glob("libggml-cpu-*.so")) + sorted(lib_dir.glob("libggml-cuda*.so"))
    if variants:
        ggml = ctypes.CDLL(str(lib_dir / "libggml.so"))
        ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
        ggml.ggml_backend_load_all_from_path(str(lib_dir).encode())
        ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
        n = int(ggml.ggml_backend_reg_count())
        log.info("loaded %d ggml backend(s) from %s (portable build)", n, lib_dir)
        return n
    return -1  # built in: nothing to load


def llama_gpu_layers(requested: int) -> int:
    """Layers to offload: ``requested`` when this llama.cpp build can offload, else 0 (logged)."""
    if requested == 0:
        return 0
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        return requested
    log.info(
        "GPU offload of %s layers requested but this llama-cpp-python build has no GPU backend; "
        "running on the CPU (rebuild with CMAKE_ARGS=-DGGML_CUDA=on, see docs/BUILDING.md)",
        "all" if requested < 0 else requested,
    )
    return 0


def ort_providers(gpu: bool) -> list[str]:
    """onnxruntime execution providers: CUDA first when asked for and available, CPU always."""
    if not gpu:
        return ["CPUExecutionProvider"]
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    log.info(
        "CUDA requested for onnxruntime but this onnxruntime has no CUDA provider "
        "(install onnxruntime-gpu); running on the CPU"
    )
    return ["CPUExecutionProvider"]


def ort_session(path: Path, *, threads: int | None = None, gpu: bool = False):
    """An onnxruntime session for ``path`` on the best provider allowed."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=ort_providers(gpu))
