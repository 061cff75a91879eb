"""The quantization ladder: a text GGUF quantized by llama.cpp (``llama_model_quantize``) to each type.

llama.cpp's quantizer has no progress callback, so progress is the output file's growing size
against the size :func:`export.gguf.checkpoint.estimate_bytes` expects.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from edge.bundle.atomic import free_bytes
from edge.errors import EdgeError
from export.gguf.checkpoint import estimate_bytes

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

QUANTS = {"Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q4_K_M": 15, "Q4_0": 2}  # llama_ftype values


@contextmanager
def _watch_size(path: Path, expected: int, progress: Progress | None):
    """Report ``path``'s growing size against ``expected`` twice a second (llama.cpp's quantizer
    has no progress callback)."""
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.5):
            try:
                progress(min(path.stat().st_size, expected), expected)
            except FileNotFoundError:
                pass

    t = threading.Thread(target=poll, daemon=True) if progress else None
    if t:
        t.start()
    try:
        yield
    finally:
        stop.set()
        if t:
            t.join()


def quantize(
    src: Path, dst: Path, *, quant: str, threads: int | None = None, progress: Progress | None = None
) -> Path:
    """Quantize a text GGUF to ``quant`` (a key of QUANTS) with ``llama_model_quantize``.

    Args:
        threads: quantizer threads (None: llama.cpp's choice).
        progress: ``(bytes written, bytes expected)`` twice a second, then ``(size, size)``.

    Raises:
        OSError: ENOSPC, when llama.cpp failed with under 1 MiB left on ``dst``'s disk (it says no
            more than a return code; the caller names the disk).
        EdgeError: llama.cpp failed otherwise (its return code is named).
    """
    import llama_cpp

    from export.gguf.fidelity import quiet_llama

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTS[quant]
    params.nthread = threads or 0
    expected = estimate_bytes(int(src.stat().st_size / 2), quant)  # src ~2 bytes per weight
    t0 = time.perf_counter()
    with _watch_size(dst, expected, progress), quiet_llama():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        free = free_bytes(dst.parent)
        if free is not None and free < (1 << 20):
            raise OSError(errno.ENOSPC, f"no space left while quantizing to {quant}", str(dst))
        raise EdgeError(f"llama.cpp could not quantize {src.name} to {quant} (return code {rc})")
    if progress:
        progress(dst.stat().st_size, dst.stat().st_size)
    log.info(
        "quantized %s -> %s (%d bytes) in %.1fs",
        src.name,
        dst.name,
        dst.stat().st_size,
        time.perf_counter() - t0,
    )
    return dst
