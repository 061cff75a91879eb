"""MedGemma's image encoders: one image in, the language model's image embeddings out.

Two interchangeable encoders give the ``[n_tokens, n_embd]`` float32 array that
:func:`edge.medgemma.llama_binding.decode_embeddings` feeds to llama.cpp:

* :class:`OnnxImageEncoder` — the vision tower + projector exported to ONNX at export time
  (``medgemma/vision-*.onnx``, fused attention, int8 weights), run by onnxruntime. The fast
  path; with it the runtime never loads the mmproj GGUF, which saves its memory.
* :class:`MmprojImageEncoder` — llama.cpp's own projector (``mmproj-*.gguf``) through libmtmd:
  the fallback, and the reference the ONNX path is tested against.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import time
from pathlib import Path

import numpy as np

from edge.device import accel
from edge.errors import InputError
from edge.media.images import LoadedImage

log = logging.getLogger(__name__)

MARKER = "<__media__>"  # libmtmd's default media marker: where an image goes in the prompt text


class OnnxImageEncoder:
    """The bundle's ONNX vision tower + projector.

    The onnxruntime session opens on the first image, not with the model: a text-only session
    never holds it. With ``keep=False`` (the phone profiles) it is closed again after each
    image, trading ~1 s of session start per new image for the encoder's memory between images.
    """

    name = "onnx"

    def __init__(self, path: Path, entry: dict, *, threads: int, gpu: bool = False, keep: bool = True):
        from edge.medsiglip.preprocess import ImageSpec

        self.path, self.entry, self.threads, self.gpu, self.keep = path, entry, threads, gpu, keep
        self.spec = ImageSpec.from_json(entry["preprocess"])
        self.n_tokens = int(entry["preprocess"].get("tokens", 256))
        self.file_bytes = path.stat().st_size
        self.session = None

    def _open(self):
        if self.session is None:
            t0 = time.perf_counter()
            self.session = accel.ort_session(self.path, threads=self.threads, gpu=self.gpu)
            log.info("opened %s in %.2fs", self.entry["path"], time.perf_counter() - t0)
        return self.session

    def tokens_for(self, image: LoadedImage) -> int:
        """How many positions ``image`` takes in the prompt (the same for every image)."""
        return self.n_tokens

    def encode(self, image: LoadedImage, n_embd: int) -> np.ndarray:
        """``image`` → its embeddings ``[n_tokens, n_embd]`` float32.

        Raises:
            InputError: the graph's output does not fit the language model.
        """
        from edge.medsiglip.preprocess import image_to_pixels

        pixels = image_to_pixels(image.image, self.spec)[None]  # [1, 3, S, S]
        try:
            out = self._open().run(None, {"pixel_values": pixels})[0][0]  # [T, n_embd]
        finally:
            if not self.keep:
                self.close()
        if out.shape != (self.n_tokens, n_embd):
            raise InputError(
                f"{self.entry['path']} gives {out.shape} embeddings; the language model expects "
                f"({self.n_tokens}, {n_embd}): the encoder does not belong to this model"
            )
        return np.ascontiguousarray(out, dtype=np.float32)

    def close(self) -> None:
        """Give the onnxruntime session back (it opens again on the next image)."""
        self.session = None


class MmprojImageEncoder:
    """llama.cpp's projector (libmtmd) for a loaded text model."""

    name = "mmproj"

    def __init__(self, path: Path, entry: dict, model, *, threads: int, flash_attn: bool, gpu: bool = False):
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd_cpp

        self.entry = entry
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = gpu and bool(llama_cpp.llama_supports_gpu_offload())
        params.print_timings = False
        params.n_threads = threads
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        self.ctx = mtmd_cpp.mtmd_init_from_file(str(path).encode(), model, params)
        if not self.ctx:
            raise InputError(f"{entry['path']}: llama.cpp could not load this vision projector")
        self.n_tokens: int | None = None  # known after the first image
        self.file_bytes = path.stat().st_size

    @contextlib.contextmanager
    def image_chunk(self, image: LoadedImage):
        """A context manager giving libmtmd's image chunk for ``image`` alone (libmtmd's own
        preprocessing: resize, normalize), freed on exit. Sets :attr:`n_tokens`.

        Raises:
            InputError: libmtmd can't take or preprocess the image.
        """
        import llama_cpp.mtmd_cpp as mtmd_cpp

        rgb = np.ascontiguousarray(np.asarray(image.image, dtype=np.uint8))
        buf = (ctypes.c_uint8 * rgb.nbytes).from_buffer_copy(rgb.tobytes())
        bitmap = mtmd_cpp.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], buf)
        if not bitmap:
            raise InputError("llama.cpp could not take this image (bitmap init failed)")
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        try:
            raw = MARKER.encode()
            text = mtmd_cpp.mtmd_input_text()
            text.text, text.text_len, text.add_special, text.parse_special = raw, len(raw), False, True
            arr = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if mtmd_cpp.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), arr, 1) != 0:
                raise InputError("llama.cpp could not preprocess this image")
            for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
                chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
                if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    self.n_tokens = int(mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk))
                    yield chunk
                    return
            raise InputError("llama.cpp produced no image chunk for this image")
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            mtmd_cpp.mtmd_bitmap_free(bitmap)

    def tokens_for(self, image: LoadedImage) -> int:
        """How many positions ``image`` takes in the prompt."""
        if self.n_tokens is None:  # Gemma 3: the same count for every image; learn it once
            with self.image_chunk(image):
                pass
        return self.n_tokens

    def encode(self, image: LoadedImage, n_embd: int) -> np.ndarray:
        """``image`` → its embeddings ``[n_tokens, n_embd]`` float32, through libmtmd."""
        import llama_cpp.mtmd_cpp as mtmd_cpp

        with self.image_chunk(image) as chunk:
            if mtmd_cpp.mtmd_encode_chunk(self.ctx, chunk) != 0:
                raise InputError("llama.cpp failed to encode the image")
            out = mtmd_cpp.mtmd_get_output_embd(self.ctx)
            n = self.n_tokens
            return np.ctypeslib.as_array(out, shape=(n * n_embd,)).copy().reshape(n, n_embd)

    def close(self) -> None:
        """Free the libmtmd context."""
        if self.ctx:
            import llama_cpp.mtmd_cpp as mtmd_cpp

            mtmd_cpp.mtmd_free(self.ctx)
            self.ctx = None
