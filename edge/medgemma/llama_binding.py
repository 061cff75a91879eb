"""Every touch of llama-cpp-python's internals, in one module.

The runtime keeps the KV cache between requests, feeds image embeddings straight into the
context and reads the last position's logits. llama-cpp-python has no public API for these,
so the functions below reach into its ``Llama`` object: the raw ``llama_context`` pointer
(``Llama._ctx.ctx``), the count of evaluated positions (``Llama.n_tokens``) and the token ids
at those positions (``Llama.input_ids``), the default model params (to switch weight
repacking) and its log callback. They are written for the binding versions in
:data:`SUPPORTED_VERSIONS`; the first use checks the installed one (:func:`binding`) and
refuses another with :class:`~edge.errors.MissingDependency`, naming both.

Feeding embeddings: :func:`decode_embeddings` does what libmtmd's
``mtmd_helper_decode_image_chunk`` does for Gemma 3 (a ``llama_batch`` with ``embd`` set,
consecutive positions, causal attention off for the image) without needing a libmtmd context,
so the ONNX image path works with no mmproj loaded. ``tests/test_kv_prefix.py`` checks the
logits equal libmtmd's own helper's exactly.

Nothing here imports llama_cpp at import time: ``import edge`` stays light.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from pathlib import Path

import numpy as np

from edge.errors import MissingDependency, ResourceError

SUPPORTED_VERSIONS = ("0.3.36",)
IMAGE_POSITION_ID = 0  # what the token list holds at image positions (they have no token id)
_PARAMS_LOCK = threading.Lock()
log = logging.getLogger(__name__)


def check_version(installed: str) -> None:
    """Raise MissingDependency unless ``installed`` is a llama-cpp-python version this module
    was written for (it relies on the binding's internals, which change between releases)."""
    if installed not in SUPPORTED_VERSIONS:
        wanted = ", ".join(SUPPORTED_VERSIONS)
        raise MissingDependency(
            f"llama-cpp-python {installed} is installed but this runtime is written for {wanted} "
            f"(it uses the binding's internals): pip install 'llama-cpp-python=={SUPPORTED_VERSIONS[-1]}'"
        )


@functools.cache
def binding():
    """The ``llama_cpp`` module, checked once to be a supported version.

    Raises:
        MissingDependency: llama-cpp-python is not installed, or is another version.
    """
    try:
        import llama_cpp
    except ImportError as exc:
        raise MissingDependency(
            f"this needs llama-cpp-python, which is not installed: "
            f"pip install 'llama-cpp-python=={SUPPORTED_VERSIONS[-1]}'"
        ) from exc
    check_version(getattr(llama_cpp, "__version__", "unknown"))
    return llama_cpp


# -- loading ----------------------------------------------------------------------------------


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU has Intel AMX (Sapphire Rapids and later Xeons), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_int8" in line.split()
    except OSError:
        pass
    return False


def effective_repack(repack: bool) -> bool:
    """``repack`` as this CPU can take it. On an AMX CPU llama.cpp's extra buffer types put the
    weights in its AMX buffer, and llama.cpp as built by llama-cpp-python 0.3.36 then crashes
    (SIGSEGV in ggml_backend_amx_mul_mat on the first decode: ggml-org/llama.cpp#20824; seen
    here on a 2-core Xeon with AMX-INT8 on the tiny twin's Q8_0). There the weights stay as they
    are in the file (mapped), which is always correct, with one log line."""
    if repack and cpu_has_amx():
        _note_amx_once()
        return False
    return repack


@functools.cache
def _note_amx_once() -> None:
    log.info(
        "llama.cpp: weight repacking is off on this AMX CPU (llama.cpp's AMX buffer crashes in this "
        "build, ggml-org/llama.cpp#20824); weights are used as stored"
    )


def load_llama(path: Path, *, repack: bool, **kwargs):
    """``llama_cpp.Llama(model_path=path, **kwargs)``, with llama.cpp's weight repacking switched
    as asked (the binding has no argument for ``use_extra_bufts``, so its default model params
    are wrapped while it loads)."""
    binding()
    import llama_cpp.llama_cpp as lc
    from llama_cpp import Llama

    repack = effective_repack(repack)

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


def quiet_native_logs(*, verbose: bool = False) -> None:
    """Route libmtmd's logs through llama-cpp-python's logger, silent unless ``verbose``."""
    binding()
    import llama_cpp._logger as llog
    import llama_cpp.mtmd_cpp as mtmd

    for setter in (mtmd.mtmd_log_set, mtmd.mtmd_helper_log_set):
        setter(llog.llama_log_callback, ctypes.c_void_p(0))
    llog.set_verbose(verbose)


# -- the context and what it holds -------------------------------------------------------------


def context(llama):
    """The raw ``llama_context`` pointer of a ``Llama``, for llama.cpp's C functions."""
    binding()
    return llama._ctx.ctx


def n_evaluated(llama) -> int:
    """How many positions of sequence 0 the context has evaluated (prompt and answer)."""
    return int(llama.n_tokens)


def evaluated_ids(llama) -> list[int]:
    """The token ids at the evaluated positions (image positions hold :data:`IMAGE_POSITION_ID`)."""
    return llama.input_ids[: llama.n_tokens].tolist()


def set_evaluated(llama, n: int) -> None:
    """Tell the ``Llama`` that the first ``n`` positions are evaluated (after a decode it did not
    do itself, or after positions were dropped)."""
    llama.n_tokens = n


def clear_kv(llama) -> None:
    """Empty the KV cache: nothing is evaluated."""
    binding()
    llama._ctx.kv_cache_clear()
    set_evaluated(llama, 0)


def remove_from(llama, pos: int) -> bool:
    """Drop positions ``pos..`` of sequence 0 from the KV cache; False if the cache can't (a
    sliding-window cache trimmed to the window). The evaluated count is left to the caller."""
    lc = binding()
    mem = lc.llama_get_memory(context(llama))
    return bool(lc.llama_memory_seq_rm(mem, 0, pos, -1))


def keep_prefix(llama, n: int) -> int:
    """Keep the first ``n`` evaluated positions and drop the rest; when the cache can't drop a
    suffix, clear it all. Returns how many positions are kept (``n`` or 0)."""
    if not remove_from(llama, n):
        clear_kv(llama)
        return 0
    set_evaluated(llama, n)
    return n


def mark_image_positions(llama, n: int) -> None:
    """Record ``n`` image positions, just decoded after the evaluated ones, as evaluated."""
    start = n_evaluated(llama)
    llama.input_ids[start : start + n] = IMAGE_POSITION_ID
    set_evaluated(llama, start + n)


def decode_embeddings(llama, embd: np.ndarray, *, non_causal: bool = True) -> None:
    """Decode ``embd`` ([n, n_embd] float32) at the next ``n`` positions of sequence 0 and record
    them as evaluated (:func:`mark_image_positions`).

    Raises:
        ResourceError: the image needs a larger batch than the context has, or llama.cpp failed.
    """
    lc = binding()
    ctx, n_batch, n_past = context(llama), int(llama.n_batch), n_evaluated(llama)
    n, n_embd = embd.shape
    if non_causal and n > n_batch:
        raise ResourceError(f"an image of {n} tokens needs a batch of at least {n} (have {n_batch})")
    data = np.ascontiguousarray(embd, dtype=np.float32)
    batch = lc.llama_batch_init(min(n, n_batch), n_embd, 1)
    try:
        if non_causal:
            lc.llama_set_causal_attn(ctx, False)
        for start in range(0, n, n_batch):
            m = min(n_batch, n - start)
            ctypes.memmove(batch.embd, data[start : start + m].ctypes.data, m * n_embd * 4)
            for j in range(m):
                batch.pos[j] = n_past + start + j
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = 0
                batch.logits[j] = False
            batch.n_tokens = m
            rc = lc.llama_decode(ctx, batch)
            if rc != 0:
                raise ResourceError(f"llama.cpp failed to decode the image embeddings (code {rc})")
    finally:
        if non_causal:
            lc.llama_set_causal_attn(ctx, True)
        lc.llama_batch_free(batch)
    mark_image_positions(llama, n)


def last_logits(llama) -> np.ndarray:
    """A copy of the logits ([n_vocab] float32) of the last position evaluated with logits."""
    lc = binding()
    ptr = lc.llama_get_logits_ith(context(llama), -1)
    return np.ctypeslib.as_array(ptr, shape=(llama.n_vocab(),)).copy()
