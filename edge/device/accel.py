"""Where the work runs: CPU threads, or a GPU when the device has one and the build can use it.

A device profile (``models/profiles.toml``) asks for GPU offload; what this process can actually
do depends on the wheels installed: llama.cpp offloads layers only if it was built with a GPU
backend (CUDA on a Jetson or a laptop), and onnxruntime runs on the GPU only with the
``onnxruntime-gpu`` wheel. Asking for a GPU the build can't use is not an error: it falls back
to the CPU with one clear log line, so the same profile works on every build.

Image encoders run on onnxruntime (CUDA when ``onnxruntime-gpu`` has it) or, with the
``openvino`` extra installed, on OpenVINO's CPU (bf16 where the CPU has AVX512-BF16/AMX), GPU
(Intel iGPUs) or NPU (Core Ultra): :func:`open_runner` gives both the same call, and a device
that isn't there falls back to the CPU with one log line (GPU/NPU/CUDA paths are not yet
checked on such hardware). :func:`cpu_class` names the CPU features the encoder order uses.

A portable llama.cpp build (``-DGGML_BACKEND_DL=ON``, see docs/BUILDING.md) keeps each CPU
variant in its own ``libggml-cpu-*.so`` and loads none until asked: :func:`load_backends` does
that once, before the first model, and is a no-op for the default (native) build.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
from functools import cache
from pathlib import Path

import numpy as np

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


# --- image encoders: CPU features, OpenVINO devices, one runner interface -------------------------

OV_DEVICES = ("CPU", "GPU", "NPU")


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_class(flags: frozenset[str] | None = None) -> str:
    """The CPU class the encoder order is chosen by: ``bf16`` (AVX512-BF16 or AMX), ``vnni``
    (AVX512-VNNI or AVX-VNNI, int8 dot products), ``avx2``, or ``other`` (e.g. ARM)."""
    f = cpu_flags() if flags is None else flags
    if {"avx512_bf16", "amx_bf16"} & f:
        return "bf16"
    if {"avx512_vnni", "avx_vnni"} & f:
        return "vnni"
    return "avx2" if "avx2" in f else "other"


def openvino_device(want: str = "CPU") -> str:
    """The OpenVINO device to compile on: ``want`` (CPU, GPU — an Intel iGPU —, NPU — a Core Ultra
    NPU —) when this machine has it, else CPU with one log line. OpenVINO must be importable."""
    import openvino as ov

    want = want.upper()
    if want == "CPU":
        return "CPU"
    have = ov.Core().available_devices  # e.g. ['CPU', 'GPU.0', 'NPU']
    if any(d.split(".")[0] == want for d in have):
        return next(d for d in have if d.split(".")[0] == want)
    log.info("OpenVINO %s requested but this machine has only %s; running on the CPU", want, ", ".join(have))
    return "CPU"


def _ov_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "medgemma-edge" / "openvino"


# OpenVINO's compiled-model cache, on the CPU too for large graphs: compiling MedGemma's fp32
# vision graph for bf16 takes 4-10 s on 2 cores (reading 1.7 GB of ONNX and converting it), loading
# the cached blob 0.5 s (measured on an AMX Xeon; the blob is 1.6 GB). Small graphs compile in
# well under a second and are not cached. At most OV_CACHE_KEEP blobs are kept (oldest removed).
OV_CACHE_MIN_BYTES = 64 << 20
OV_CACHE_KEEP = 4
OV_CACHE_ENV = "MEDGEMMA_EDGE_OPENVINO_CACHE"  # "0": never cache


def _ov_cacheable(path: Path, device: str) -> bool:
    if os.environ.get(OV_CACHE_ENV, "1") == "0":
        return False
    if device != "CPU":  # a GPU/NPU compile takes minutes
        return True
    weights = path.with_suffix(".bin") if path.suffix == ".xml" else None
    size = path.stat().st_size + (weights.stat().st_size if weights is not None and weights.exists() else 0)
    return size >= OV_CACHE_MIN_BYTES


def _prune_ov_cache(d: Path, keep: int = OV_CACHE_KEEP) -> None:
    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:  # removed meanwhile by another process
            return 0.0

    blobs = sorted(d.glob("*.blob"), key=mtime, reverse=True)
    for old in blobs[keep:]:
        with contextlib.suppress(OSError):
            size = old.stat().st_size
            old.unlink()
            log.info(
                "OpenVINO cache: removed %s (%d MiB; the newest %d are kept)", old.name, size >> 20, keep
            )


class Runner:
    """One compiled encoder file: ``run(feeds) -> [outputs]`` in the graph's output order, the
    same call for onnxruntime and OpenVINO. ``engine`` says which ran it, ``device`` where."""

    def __init__(self, engine: str, device: str, run, outputs: list[str]):
        self.engine, self.device, self.outputs, self._run = engine, device, outputs, run

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._run(feeds)


def open_runner(
    path: Path, runtime: str, *, threads: int | None = None, hint: str | None = None, gpu: bool = False
) -> Runner:
    """Compile ``path`` for ``runtime`` ("onnxruntime" or "openvino").

    ``hint``: OpenVINO's inference precision ("f32", "bf16"; None: the plugin's default).
    ``gpu``: onnxruntime → CUDA; OpenVINO → its GPU, else its NPU; each falls back to the CPU
    with a log line.

    Raises:
        MissingDependency: OpenVINO asked for and not installed (the caller falls back).
        IntegrityError: the runtime can't load the file.
    """
    from edge.errors import IntegrityError, require

    if runtime == "onnxruntime":
        sess = ort_session(path, threads=threads, gpu=gpu)
        names = [o.name for o in sess.get_outputs()]
        return Runner("onnxruntime", sess.get_providers()[0], lambda feeds: sess.run(None, feeds), names)
    if runtime != "openvino":
        raise ValueError(f"unknown runtime {runtime!r}")
    ov = require("openvino", "openvino")
    device = "CPU"
    if gpu:
        device = openvino_device("GPU")
        if device == "CPU":
            device = openvino_device("NPU")
    config: dict = {"PERFORMANCE_HINT": "LATENCY"}
    if device == "CPU":
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if hint:
            config["INFERENCE_PRECISION_HINT"] = hint
    core = ov.Core()
    cache_dir = _ov_cache_dir() if _ov_cacheable(Path(path), device) else None
    if cache_dir is not None:  # the compiled blob is cached for the next start
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(cache_dir)})
        except OSError as exc:  # a read-only or full cache: compile every time
            log.info("OpenVINO cache unavailable (%s); compiling %s without it", exc, Path(path).name)
            cache_dir = None
    try:
        compiled = core.compile_model(str(path), device, config)
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
        raise IntegrityError(
            f"{path}: OpenVINO can't compile it ({str(exc).splitlines()[0][:200]})"
        ) from None
    if cache_dir is not None:
        _prune_ov_cache(cache_dir)
    names = [o.get_any_name() for o in compiled.outputs]
    request = compiled.create_infer_request()

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        res = request.infer(feeds)
        return [np.array(res[o], copy=True) for o in compiled.outputs]

    return Runner("openvino", device, run, names)
