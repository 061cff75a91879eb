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
import sys
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)


def _backend_dirs() -> list[Path]:
    """Where a portable wheel puts its ``libggml-cpu-*.so`` variants: llama-cpp-python 0.3.36's
    CMake install drops them in ``site-packages/bin/``; other builds use the package's ``lib/``
    or the environment's ``bin/`` (next to the Python executable, where ggml's own search looks)."""
    import llama_cpp

    pkg = Path(llama_cpp.__file__).resolve().parent
    dirs = [pkg.parent / "bin", pkg / "lib", Path(sys.prefix) / "bin", Path(sys.executable).parent]
    return [d for i, d in enumerate(dirs) if d not in dirs[:i] and d.is_dir()]


def _loaded_ggml() -> Path | None:
    """The libggml file libllama actually loaded. A wheel stores ``libggml.so``, ``.so.0`` and
    ``.so.0.x`` as separate copies; opening another copy would give a second, empty backend
    registry that llama.cpp never sees."""
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split()[-1]
            if Path(path).name.startswith("libggml.so"):
                return Path(path)
    except OSError:
        pass
    return None


@cache
def load_backends() -> int:
    """Load dynamically built ggml backends (portable builds); returns how many are registered
    (-1: a default build, nothing to load)."""
    import llama_cpp

    found = [d for d in _backend_dirs() if any(d.glob("libggml-cpu-*.so"))]
    if not found:
        return -1
    ggml = ctypes.CDLL(str(_loaded_ggml() or Path(llama_cpp.__file__).parent / "lib" / "libggml.so"))
    ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    for d in found:
        ggml.ggml_backend_load_all_from_path(str(d).encode())
    n = int(ggml.ggml_backend_reg_count())
    log.info("portable llama.cpp build: %d backend(s) loaded from %s", n, ", ".join(map(str, found)))
    return n


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
    """An onnxruntime session for ``path`` on the best provider allowed.

    Raises:
        IntegrityError: onnxruntime can't load the file (truncated, corrupt, not ONNX).
    """
    import onnxruntime as ort

    from edge.errors import IntegrityError

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), so, providers=ort_providers(gpu))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise IntegrityError(f"{path}: onnxruntime can't load it ({str(exc).splitlines()[0]})") from None
