"""The quantization ladder: a text GGUF quantized by llama.cpp to each type.

Without an importance matrix the quantizer runs in process (``llama_model_quantize`` of the
installed llama-cpp-python); with one, llama.cpp's own ``llama-quantize --imatrix`` (the same
llama.cpp, built by ``make llama-tools``: the binding can't pass a matrix). The IQ types are
made only with a matrix: without one their few bits go where the text doesn't need them.

K-quants and IQ types work on 256-wide blocks: a tensor whose rows are not a multiple of 256
falls back per tensor to a 32-wide type (every tensor of the tiny twin; the manifest's
``tensor_types`` says what each file really holds).

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
from edge.errors import EdgeError, UsageError
from export.gguf.checkpoint import estimate_bytes

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

# the ladder, most bits first: llama_ftype values
QUANTS = {
    "Q8_0": 7,
    "Q6_K": 18,
    "Q5_K_M": 17,
    "Q4_K_M": 15,
    "IQ4_XS": 30,
    "Q4_0": 2,
    "IQ3_M": 27,
}
NEEDS_IMATRIX = ("IQ4_XS", "IQ3_M")


def check_imatrix(quants: list[str], *, imatrix: bool) -> None:
    """UsageError for an IQ type asked for without an importance matrix."""
    iq = [q for q in quants if q in NEEDS_IMATRIX]
    if iq and not imatrix:
        raise UsageError(
            f"{', '.join(iq)} {'needs' if len(iq) == 1 else 'need'} an importance matrix: add "
            "--imatrix default (the project's calibration text) or --imatrix FILE (your own text)"
        )


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
    src: Path,
    dst: Path,
    *,
    quant: str,
    threads: int | None = None,
    imatrix: Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """Quantize a text GGUF to ``quant`` (a key of QUANTS): in process, or with ``imatrix`` by
    ``llama-quantize --imatrix``.

    Args:
        threads: quantizer threads (None: llama.cpp's choice).
        imatrix: an importance matrix (:func:`export.gguf.imatrix.compute`).
        progress: ``(bytes written, bytes expected)`` twice a second, then ``(size, size)``.

    Raises:
        OSError: ENOSPC, when llama.cpp failed with under 1 MiB left on ``dst``'s disk (it says no
            more than a return code; the caller names the disk).
        EdgeError: llama.cpp failed otherwise (its return code is named).
        UsageError: an IQ type without ``imatrix``.
        MissingDependency: ``imatrix`` given and the tools are not built (names the make target).
    """
    check_imatrix([quant], imatrix=imatrix is not None)
    expected = estimate_bytes(int(src.stat().st_size / 2), quant)  # src ~2 bytes per weight
    if imatrix is not None:
        return _with_tool(
            src, dst, quant=quant, threads=threads, imatrix=imatrix, expected=expected, progress=progress
        )
    import llama_cpp

    from export.gguf.fidelity import quiet_llama

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTS[quant]
    params.nthread = threads or 0
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


def _with_tool(
    src: Path, dst: Path, *, quant: str, threads: int | None, imatrix: Path, expected: int, progress
) -> Path:
    """``llama-quantize --imatrix MATRIX SRC DST TYPE [THREADS]``."""
    from export.gguf.llama_tools import find_tools, run_tool

    tools = find_tools()
    # the matrix by a relative name: the quantized GGUF records it (quantize.imatrix.file), and
    # the workstation's directories have no business in a file that is handed around
    args = ["--imatrix", imatrix.name, str(src.resolve()), str(dst.resolve()), quant]
    if threads:
        args.append(str(threads))
    t0 = time.perf_counter()
    try:
        with _watch_size(dst, expected, progress):
            out = run_tool(tools, "llama-quantize", args, what=f"quantizing to {quant}", cwd=imatrix.parent)
    except EdgeError:
        free = free_bytes(dst.parent)
        if free is not None and free < (1 << 20):
            raise OSError(errno.ENOSPC, f"no space left while quantizing to {quant}", str(dst)) from None
        raise
    if "importance matrix" not in out or not dst.is_file():  # it must have used the matrix
        raise EdgeError(f"llama-quantize did not load the importance matrix {imatrix.name} for {quant}")
    if progress:
        progress(dst.stat().st_size, dst.stat().st_size)
    log.info(
        "quantized %s -> %s with imatrix (%d bytes) in %.1fs",
        src.name,
        dst.name,
        dst.stat().st_size,
        time.perf_counter() - t0,
    )
    return dst
