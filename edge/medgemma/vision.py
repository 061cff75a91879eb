"""MedGemma's image encoders: one image in, the language model's image embeddings out.

Two interchangeable encoders give the ``[n_tokens, n_embd]`` float32 array that
:func:`edge.medgemma.llama_binding.decode_embeddings` feeds to llama.cpp:

* :class:`OnnxImageEncoder` — the vision tower + projector exported at export time
  (``medgemma/vision-*.onnx``: fused attention, fp32 / dynamic int8 / static int8; and
  ``vision-openvino-int8.xml`` for OpenVINO), run by onnxruntime or OpenVINO, whichever engine
  :mod:`edge.device.encoders` chooses for this device. The fast path; with it the runtime never
  loads the mmproj GGUF, which saves its memory.
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

from edge.device import encoders
from edge.errors import EdgeError, InputError, UsageError
from edge.media.images import LoadedImage

log = logging.getLogger(__name__)

MARKER = "<__media__>"  # libmtmd's default media marker: where an image goes in the prompt text


ROLES = {"vision-onnx", "vision-openvino"}  # the encoder files an engine can run


class OnnxImageEncoder:
    """The bundle's exported image encoder (vision tower + projector), on the best engine here.

    The bundle may hold the graph several ways (fp32, dynamic int8, static int8 for onnxruntime;
    NNCF int8 for OpenVINO, which also runs the fp32 graph in bf16): ``engine="auto"`` runs the one
    :func:`edge.device.encoders.candidates` puts first for this device (its calibration, else its
    CPU class), and falls back down that list with one log line when a runtime is missing or can't
    load a file; a named engine (``"ort-int8-static"``, ``"ov-int8"``...) goes first instead.
    ``entry`` is the file the caller chose (always a candidate); :attr:`entry` becomes the file
    planned (it names the image-cache key), :attr:`engine` the engine that ran.

    The runtime session opens on the first image, not with the model: a text-only session never
    holds it. With ``keep=False`` (the phone profiles) it is closed again after each image,
    trading ~1 s of session start per new image for the encoder's memory between images.
    """

    name = "onnx"

    def __init__(
        self,
        path: Path,
        entry: dict,
        *,
        threads: int,
        gpu: bool = False,
        keep: bool = True,
        engine: str = "auto",
        bundle=None,
        low_memory: bool | None = None,
    ):
        from edge.medsiglip.preprocess import ImageSpec

        if engine != "auto" and engine not in encoders.ENGINES:
            raise UsageError(f"unknown image engine {engine!r} (auto, {', '.join(encoders.ENGINES)})")
        self.path, self.entry, self.threads, self.gpu, self.keep = path, entry, threads, gpu, keep
        self.requested = engine
        # int8 files before fp32 ones (a quarter of the memory): the phone profiles, which give
        # the encoder's memory back, and a device where the fp32 engine would not fit
        self.low_memory = (not keep) if low_memory is None else low_memory
        self.bundle = bundle if bundle is not None else _bundle_of(path, entry)
        self.spec = ImageSpec.from_json(entry["preprocess"])
        self.n_tokens = int(entry["preprocess"].get("tokens", 256))
        self.given = entry
        self.plan = self.candidates()  # decided now, so the image-cache key (entry's hash) is stable
        self.entry = self.plan[0][1]
        if self.entry is not entry:
            self.path = self.bundle.path(self.entry)
        self.file_bytes = self.path.stat().st_size
        self.engine: str | None = None  # the engine that ran (known once the first image opens it)
        self.runner = None

    def candidates(self) -> list:
        """(engine, entry) pairs in the order this encoder tries them."""
        files = self.bundle.component("medgemma")["files"] if self.bundle is not None else [self.given]
        first = None if self.requested == "auto" else self.requested
        cands = encoders.candidates(
            files,
            ROLES,
            fingerprint=self.fingerprint if self.bundle else None,
            preferred=first,
            low_memory=self.low_memory,
        )
        own = encoders.ENGINES[encoders.engine_for(self.given)]
        if not any(e.name == own.name for e, _ in cands):
            cands.append((own, self.given))
        if first and cands[0][0].name != first:
            log.warning(
                "image encoder: engine %s needs %s, which this bundle does not have; using %s",
                first,
                encoders.ENGINES[first].precision,
                cands[0][0].name,
            )
        return cands

    @property
    def fingerprint(self) -> str:
        """The calibration record's key: the medgemma component's exact files."""
        return self.bundle.fingerprint("medgemma")

    def _path_of(self, entry: dict) -> Path:
        """``entry``'s path, verified first unless it is the file the loader verified."""
        if self.bundle is None or entry is self.given:
            return self.bundle.path(entry) if self.bundle is not None else self.path
        files = self.bundle.component("medgemma")["files"]
        wanted = {entry["path"]} | {f["path"] for f in files if f.get("data_of") == entry["path"]}
        self.bundle.verify(component="medgemma", paths=wanted).raise_for_failure()
        return self.bundle.path(entry)

    def _open(self):
        if self.runner is None:
            t0 = time.perf_counter()
            engine, entry, self.runner = encoders.open_first(
                self.plan, self._path_of, threads=self.threads, gpu=self.gpu, what="image encoder"
            )
            if entry is not self.entry:  # fell back to another file
                self.entry, self.path = entry, self.bundle.path(entry)
            self.engine = engine.name
            log.info(
                "opened %s on %s (%s, %s) in %.2fs",
                self.entry["path"],
                self.engine,
                self.runner.engine,
                self.runner.device,
                time.perf_counter() - t0,
            )
        return self.runner

    def tokens_for(self, image: LoadedImage) -> int:
        """How many positions ``image`` takes in the prompt (the same for every image)."""
        return self.n_tokens

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """``pixel_values`` ``[B, 3, S, S]`` → ``[B, n_tokens, n_embd]`` float32 (no shape check)."""
        try:
            return self._open().run({"pixel_values": pixels})[0]
        finally:
            if not self.keep:
                self.close()

    def encode(self, image: LoadedImage, n_embd: int) -> np.ndarray:
        """``image`` → its embeddings ``[n_tokens, n_embd]`` float32.

        Raises:
            InputError: the graph's output does not fit the language model.
        """
        from edge.medsiglip.preprocess import image_to_pixels

        out = self.encode_pixels(image_to_pixels(image.image, self.spec)[None])[0]  # [T, n_embd]
        if out.shape != (self.n_tokens, n_embd):
            raise InputError(
                f"{self.entry['path']} gives {out.shape} embeddings; the language model expects "
                f"({self.n_tokens}, {n_embd}): the encoder does not belong to this model"
            )
        return np.ascontiguousarray(out, dtype=np.float32)

    def close(self) -> None:
        """Give the runtime's session back (it opens again on the next image)."""
        self.runner = None


def calibrate(bundle, image: LoadedImage, *, threads: int, bar: float = encoders.FIDELITY_BAR) -> dict:
    """Time every engine this device can run the bundle's image encoder with, on ``image``, and
    record the fastest that meets ``bar`` (:func:`edge.device.encoders.record`).

    Each engine's cosine is measured here against the fp32 graph on onnxruntime (when the
    bundle has it) and must meet ``bar``, as must its recorded fidelity. With none meeting it,
    today's dynamic int8 is kept. Returns ``{"choice", "engines": {name: {...}}, "state"}``.

    Raises:
        InputError: the bundle has no exported image encoder.
    """
    from edge.medsiglip.preprocess import image_to_pixels

    files = bundle.component("medgemma")["files"]
    cands = encoders.candidates(files, ROLES, bar=-1.0)
    if not cands:
        raise InputError(f"bundle {bundle.root} has no exported image encoder to calibrate")
    pixels = image_to_pixels(image.image, _spec_of(cands[0][1]))[None]
    cands.sort(key=lambda c: c[0].name != "ort-fp32")  # the reference first
    figures: dict[str, dict] = {}
    ref = None
    for engine, entry in cands:
        enc = OnnxImageEncoder(bundle.path(entry), entry, threads=threads, engine=engine.name, bundle=bundle)
        try:
            t0 = time.perf_counter()
            enc._open()
            opened = time.perf_counter() - t0
            if enc.engine != engine.name:  # fell back (the runtime is missing): not this engine
                continue
            t0 = time.perf_counter()
            out = enc.encode_pixels(pixels)[0]
            row = {"seconds": time.perf_counter() - t0, "open_seconds": opened, "device": enc.runner.device}
        except EdgeError as exc:
            log.warning("calibration: engine %s failed (%s)", engine.name, str(exc).splitlines()[0][:160])
            continue
        finally:
            enc.close()
        if engine.name == "ort-fp32":
            ref = out
        if ref is not None:
            a, b = ref.astype(np.float64), out.astype(np.float64)
            cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
            row["cosine_min_vs_fp32"] = float(cos.min())
        row["recorded_cosine_min"] = encoders.fidelity_of(files, engine.name)
        row["meets_bar"] = all(
            v is None or v >= bar for v in (row.get("cosine_min_vs_fp32"), row["recorded_cosine_min"])
        )
        figures[engine.name] = row
        log.info(
            "calibration: %s %.2fs (cosine %s)", engine.name, row["seconds"], row.get("cosine_min_vs_fp32")
        )
    good = [n for n, r in figures.items() if r["meets_bar"]]
    choice = (
        min(good, key=lambda n: figures[n]["seconds"])
        if good
        else ("ort-int8" if "ort-int8" in figures else None)
    )
    if choice is None:
        raise InputError(f"bundle {bundle.root}: no image-encoder engine could run on this device")
    path = encoders.record(bundle.fingerprint("medgemma"), choice, {"bar": bar, "engines": figures})
    return {"choice": choice, "engines": figures, "state": str(path)}


def _spec_of(entry: dict):
    from edge.medsiglip.preprocess import ImageSpec

    return ImageSpec.from_json(entry["preprocess"])


def _bundle_of(path: Path, entry: dict):
    """The bundle ``path`` (= bundle root / ``entry['path']``) belongs to; None when it isn't one."""
    from edge.bundle.manifest import open_bundle
    from edge.errors import EdgeError

    rel = Path(entry.get("path", ""))
    if not rel.parts or Path(path).parts[-len(rel.parts) :] != rel.parts:
        return None
    try:
        return open_bundle(Path(path).parents[len(rel.parts) - 1])
    except EdgeError:
        return None


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
