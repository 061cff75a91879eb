"""MedGemma on the device: a bundle's GGUF through llama-cpp-python, images through libmtmd.

The core is :meth:`MedGemma.stream`, a generator of :class:`Piece` (text, token counts,
timings, and on the last piece the finish reason and usage). ``ask`` joins it; the CLI, the
bridge and the server all consume the same generator. One instance serves one request at a
time (a lock); ``cancel`` (a ``threading.Event``) set from another thread stops the stream
within one token with finish reason ``cancelled``.

Images go through libmtmd's own pieces rather than its all-in-one helper, so that an encoded
image can be cached: ``mtmd_encode_chunk`` → copy ``mtmd_get_output_embd`` into the
:class:`~edge.image_cache.ImageCache` → ``mtmd_helper_decode_image_chunk`` feeds the (cached or
fresh) embeddings with Gemma 3's positions and non-causal image attention. A follow-up
question about the same image skips the vision encoder entirely.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from edge import prompting, resources
from edge.bundle import Bundle, open_bundle
from edge.errors import Busy, ContextOverflow, InputError, ResourceError, UsageError
from edge.generation import DISCLAIMER, Answer, GenerateOptions, Piece, check_schema
from edge.gguf_header import read_header
from edge.image_cache import ImageCache
from edge.images import LoadedImage

log = logging.getLogger(__name__)

__all__ = ["DISCLAIMER", "Answer", "GenerateOptions", "MedGemma", "Piece", "check_schema", "resolve_bundle"]

_KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "q4_0": 2}  # ggml type ids
Progress = Callable[[str, int, int], None]  # (stage, done, total)


def _quiet_native_logs() -> None:
    """Route libmtmd's logs through llama-cpp-python's logger (silent unless verbose)."""
    import llama_cpp._logger as llog
    import llama_cpp.mtmd_cpp as mtmd

    for setter in (mtmd.mtmd_log_set, mtmd.mtmd_helper_log_set):
        setter(llog.llama_log_callback, ctypes.c_void_p(0))
    llog.set_verbose(log.isEnabledFor(logging.DEBUG))


class MedGemma:
    """A loaded MedGemma (or any Gemma 3 GGUF) from a bundle.

    Args:
        bundle: a bundle directory or an opened :class:`Bundle` with a ``medgemma`` component.
        quant: which text file (e.g. ``"Q4_K_M"``); default the first listed.
        n_ctx: context length in tokens; a prompt longer than this is refused.
        n_threads: CPU threads (default: all cores).
        flash_attn: on by default (it made image encoding 1.7x faster on the 2-core CPU).
        kv_type: KV cache type: f16 (default), q8_0, q4_0, f32.
        use_mmap: map the weights instead of reading them into RAM.
        vision: load the projector (if the bundle has one) so images can be asked about.
        image_cache: where encoded images are kept (default: a 512 MiB in-memory LRU).
        check_memory: refuse (ResourceError, exit 4) when the estimate exceeds free memory.
    Raises:
        InputError / IntegrityError: missing component or file, hash mismatch (names the file).
        ResourceError: not enough memory for the model and context.
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        *,
        quant: str | None = None,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        flash_attn: bool = True,
        kv_type: str = "f16",
        use_mmap: bool = True,
        vision: bool = True,
        image_cache: ImageCache | None = None,
        check_memory: bool = True,
        seed: int = 0,
        image_encoder: str = "auto",
    ):
        from llama_cpp import LLAMA_FLASH_ATTN_TYPE_DISABLED, LLAMA_FLASH_ATTN_TYPE_ENABLED, Llama

        t0 = time.perf_counter()
        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
        comp = self.bundle.component("medgemma")
        text_entry = self.bundle.file("medgemma", "text", **({"quant": quant} if quant else {}))
        mmproj_entries = [f for f in comp["files"] if f["role"] == "mmproj"] if vision else []
        onnx_entries = (
            sorted(
                (f for f in comp["files"] if f["role"] == "vision-onnx"),
                key=lambda f: f.get("precision") != "int8",
            )
            if vision
            else []
        )
        if image_encoder not in ("auto", "mmproj", "onnx"):
            raise UsageError(f"unknown image encoder {image_encoder!r} (auto, mmproj or onnx)")
        if image_encoder == "onnx" and not onnx_entries:
            raise InputError(f"bundle {self.bundle.root} has no ONNX image encoder (medgemma/vision-*.onnx)")
        if image_encoder == "mmproj":
            onnx_entries = []
        self.vision_entry = onnx_entries[0] if onnx_entries else None
        wanted = {text_entry["path"]} | {e["path"] for e in mmproj_entries[:1] + onnx_entries[:1]}
        self.bundle.verify(component="medgemma", paths=wanted).raise_for_failure()
        if kv_type not in _KV_TYPES:
            raise UsageError(f"unknown KV cache type {kv_type!r} (one of {', '.join(_KV_TYPES)})")
        text_path = self.bundle.path(text_entry)
        self.mmproj_entry = mmproj_entries[0] if mmproj_entries else None
        mmproj_path = self.bundle.path(self.mmproj_entry) if self.mmproj_entry else None
        header = read_header(text_path)
        self.memory_estimate = resources.estimate(
            text_path, header, mmproj=mmproj_path, n_ctx=n_ctx, kv_type=kv_type
        )
        if check_memory:
            free = resources.available_memory()
            if self.memory_estimate.total > free:
                raise ResourceError(
                    f"this device has {free / 2**30:.2f} GiB free but {text_entry['path']} at context {n_ctx} "
                    f"needs about {self.memory_estimate.describe()}; use a smaller quantization or --ctx"
                )
        n_ctx_train = int(header.arch_key("context_length", n_ctx) or n_ctx)
        self.n_threads = n_threads or os.cpu_count() or 1
        _quiet_native_logs()
        self.llama = Llama(
            model_path=str(text_path),
            n_ctx=min(n_ctx, n_ctx_train),
            n_threads=self.n_threads,
            n_threads_batch=self.n_threads,
            flash_attn=flash_attn,
            use_mmap=use_mmap,
            seed=seed,
            type_k=_KV_TYPES[kv_type],
            type_v=_KV_TYPES[kv_type],
            verbose=log.isEnabledFor(logging.DEBUG),
        )
        self.n_ctx = min(n_ctx, n_ctx_train, self.llama.n_ctx())  # llama.cpp may pad its own upwards
        self.mtmd = None
        if mmproj_path is not None:
            import llama_cpp.mtmd_cpp as mtmd_cpp

            params = mtmd_cpp.mtmd_context_params_default()
            params.use_gpu = False
            params.print_timings = False
            params.n_threads = self.n_threads
            params.flash_attn_type = (
                LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
            self.mtmd = mtmd_cpp.mtmd_init_from_file(str(mmproj_path).encode(), self.llama.model, params)
            if not self.mtmd:
                raise InputError(
                    f"{self.mmproj_entry['path']}: llama.cpp could not load this vision projector"
                )
            self.media_marker = mtmd_cpp.mtmd_default_marker().decode()
        else:
            self.media_marker = None
        self.prompt_spec = comp.get("prompt", {})
        self.template = self.prompt_spec.get("chat_template") or self.llama.metadata.get(
            "tokenizer.chat_template"
        )
        if not self.template:
            raise InputError(
                f"bundle {self.bundle.root}: the model has no chat template and the manifest gives none"
            )
        self.defaults = {
            "temperature": 0.0,
            "max_tokens": 512,
            "repeat_penalty": 1.0,
            **comp.get("defaults", {}),
        }
        self.image_cache = image_cache if image_cache is not None else ImageCache()
        self.vision_session = None
        if self.vision_entry is not None and self.mtmd is not None:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = self.n_threads
            self.vision_session = ort.InferenceSession(
                str(self.bundle.path(self.vision_entry)), so, providers=["CPUExecutionProvider"]
            )
        self._images_by_key: dict[str, LoadedImage] = {}
        self._lock = threading.Lock()
        self.load_seconds = time.perf_counter() - t0
        self.info = {
            "bundle": str(self.bundle.root),
            "text": text_entry["path"],
            "quant": text_entry.get("quant"),
            "mmproj": self.mmproj_entry["path"] if self.mmproj_entry else None,
            "image_encoder": self.vision_entry["path"] if self.vision_session else "mmproj (llama.cpp)",
            "n_ctx": self.n_ctx,
            "source": comp.get("source", {}).get("description") or comp.get("source", {}).get("model_id"),
            "synthetic": bool(comp.get("source", {}).get("synthetic")),
        }
        log.info(
            "loaded %s (%s) in %.2fs; estimate %s",
            text_entry["path"],
            text_entry.get("quant"),
            self.load_seconds,
            self.memory_estimate.describe(),
        )

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def close(self) -> None:
        if self.mtmd is not None:
            import llama_cpp.mtmd_cpp as mtmd_cpp

            mtmd_cpp.mtmd_free(self.mtmd)
            self.mtmd = None
        self.llama.close()

    def __enter__(self) -> MedGemma:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- prompt -----------------------------------------------------------------------------------

    def render(self, messages: list[dict]) -> tuple[str, int]:
        msgs, n_images = prompting.normalize(messages, self.media_marker)
        bos = self.llama.detokenize([self.llama.token_bos()], special=True).decode("utf-8", "ignore")
        eos = self.llama.detokenize([self.llama.token_eos()], special=True).decode("utf-8", "ignore")
        return prompting.render(self.template, msgs, bos_token=bos, eos_token=eos), n_images

    def _image_key(self, image: LoadedImage) -> str:
        encoder = self.vision_entry if self.vision_session is not None else self.mmproj_entry
        return f"{image.key[:32]}-{encoder['sha256'][:16]}"

    def _encode_onnx(self, image: LoadedImage, n_tok: int, n_embd: int) -> np.ndarray:
        """The ONNX tower + projector's embeddings for one image: [n_tok, n_embd] float32."""
        from edge.siglip_preprocess import ImageSpec, image_to_pixels

        spec = ImageSpec.from_json(self.vision_entry["preprocess"])
        pixels = image_to_pixels(image.image, spec)[None]  # [1, 3, S, S]
        out = self.vision_session.run(None, {"pixel_values": pixels})[0][0]  # [T, n_embd]
        if out.shape != (n_tok, n_embd):
            raise InputError(
                f"{self.vision_entry['path']} gives {out.shape} embeddings; llama.cpp expects "
                f"({n_tok}, {n_embd}): the encoder does not belong to this model"
            )
        return out

    def _tokenize_mtmd(self, text: str, images: Sequence[LoadedImage]):
        import llama_cpp.mtmd_cpp as mtmd_cpp

        bitmaps = []
        try:
            for im in images:
                rgb = np.ascontiguousarray(np.asarray(im.image, dtype=np.uint8))
                buf = (ctypes.c_uint8 * rgb.nbytes).from_buffer_copy(rgb.tobytes())
                bm = mtmd_cpp.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], buf)
                if not bm:
                    raise InputError("llama.cpp could not take this image (bitmap init failed)")
                key = self._image_key(im)
                mtmd_cpp.mtmd_bitmap_set_id(bm, key.encode())
                self._images_by_key[key] = im
                bitmaps.append(bm)
            raw = text.encode("utf-8")
            inp = mtmd_cpp.mtmd_input_text()
            inp.text, inp.text_len, inp.add_special, inp.parse_special = raw, len(raw), False, True
            chunks = mtmd_cpp.mtmd_input_chunks_init()
            arr = (mtmd_cpp.mtmd_bitmap_p_ctypes * max(len(bitmaps), 1))(*bitmaps)
            rc = mtmd_cpp.mtmd_tokenize(self.mtmd, chunks, ctypes.byref(inp), arr, len(bitmaps))
            if rc != 0:
                mtmd_cpp.mtmd_input_chunks_free(chunks)
                raise UsageError(
                    f"the prompt's image markers don't match the {len(images)} image(s) given (mtmd {rc})"
                )
            return chunks
        finally:
            for bm in bitmaps:
                mtmd_cpp.mtmd_bitmap_free(bm)

    def _eval_chunks(
        self, chunks, cancel: threading.Event | None, progress: Progress | None, stats: dict
    ) -> None:
        """Feed text and image chunks into the context; images through the cache."""
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd_cpp

        n = mtmd_cpp.mtmd_input_chunks_size(chunks)
        n_images = sum(
            mtmd_cpp.mtmd_input_chunk_get_type(mtmd_cpp.mtmd_input_chunks_get(chunks, i))
            == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE
            for i in range(n)
        )
        done_images = 0
        no_callback = ctypes.cast(None, mtmd_cpp.mtmd_helper_post_decode_callback)
        n_embd = llama_cpp.llama_model_n_embd(self.llama.model)
        for i in range(n):
            if cancel is not None and cancel.is_set():
                return
            chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
            if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n_tok = ctypes.c_size_t()
                ptr = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n_tok))
                self.llama.eval([ptr[j] for j in range(n_tok.value)])
                continue
            key = mtmd_cpp.mtmd_input_chunk_get_id(chunk).decode()
            n_tok = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
            if progress:
                progress("image", done_images, n_images)
            embd = self.image_cache.get(key)
            if embd is None:
                t0 = time.perf_counter()
                if self.vision_session is not None:
                    embd = self._encode_onnx(self._images_by_key[key], n_tok, n_embd)
                else:
                    if mtmd_cpp.mtmd_encode_chunk(self.mtmd, chunk) != 0:
                        raise InputError("llama.cpp failed to encode the image")
                    out = mtmd_cpp.mtmd_get_output_embd(self.mtmd)
                    embd = np.ctypeslib.as_array(out, shape=(n_tok * n_embd,)).copy().reshape(n_tok, n_embd)
                self.image_cache.put(key, embd)
                stats["image_encode_s"] += time.perf_counter() - t0
                stats["image_cache_misses"] += 1
            else:
                stats["image_cache_hits"] += 1
            new_n_past = llama_cpp.llama_pos(self.llama.n_tokens)
            ptr = np.ascontiguousarray(embd, dtype=np.float32).ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            rc = mtmd_cpp.mtmd_helper_decode_image_chunk(
                self.mtmd,
                self.llama._ctx.ctx,
                chunk,
                ptr,
                self.llama.n_tokens,
                0,
                self.llama.n_batch,
                ctypes.byref(new_n_past),
                no_callback,
                None,
            )
            if rc != 0:
                raise ResourceError(f"llama.cpp failed to decode the image embeddings (code {rc})")
            self.llama.n_tokens = new_n_past.value
            done_images += 1
            if progress:
                progress("image", done_images, n_images)

    def _prefill(self, messages, images, cancel, progress, stats) -> list[int]:
        """Render, tokenize, check the context, evaluate. Returns the prompt's token ids."""
        import llama_cpp.mtmd_cpp as mtmd_cpp

        text, n_markers = self.render(messages)
        if n_markers != len(images):
            raise UsageError(
                f"the conversation has {n_markers} image part(s) but {len(images)} image(s) were given"
            )
        self.llama.reset()
        self.llama._ctx.kv_cache_clear()
        if self.mtmd is None:
            tokens = self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            self._check_context(len(tokens), 0)
            self.llama.eval(tokens)
            return tokens
        chunks = self._tokenize_mtmd(text, images)
        try:
            n_prompt = mtmd_cpp.mtmd_helper_get_n_tokens(chunks)
            self._check_context(n_prompt, len(images))
            self._eval_chunks(chunks, cancel, progress, stats)
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            self._images_by_key.clear()
        return self.llama.input_ids[: self.llama.n_tokens].tolist()

    def _check_context(self, n_prompt: int, n_images: int) -> None:
        if n_prompt >= self.n_ctx:
            with_images = f", {n_images} image(s) included" if n_images else ""
            raise ContextOverflow(
                f"the prompt needs {n_prompt} tokens{with_images} but the context holds {self.n_ctx}; "
                f"shorten it or load with a larger context (--ctx)"
            )

    # -- generation -------------------------------------------------------------------------------

    def stream(
        self,
        messages: list[dict],
        *,
        images: Sequence[LoadedImage] = (),
        options: GenerateOptions | None = None,
        cancel: threading.Event | None = None,
        progress: Progress | None = None,
        wait: bool = True,
    ) -> Iterator[Piece]:
        """Generate an answer to ``messages`` piece by piece (see the module docstring)."""
        from llama_cpp import LlamaGrammar, StoppingCriteriaList

        opts = options or GenerateOptions()
        if not self._lock.acquire(blocking=wait):
            raise Busy("the model is answering another request; try again when it finishes")
        try:
            t0 = time.perf_counter()
            stats = {"image_encode_s": 0.0, "image_cache_hits": 0, "image_cache_misses": 0}
            prompt = self._prefill(messages, images, cancel, progress, stats)
            t_prompt = time.perf_counter()
            n_prompt = len(prompt)
            max_tokens = opts.max_tokens or int(self.defaults["max_tokens"])
            max_tokens = max(1, min(max_tokens, self.n_ctx - n_prompt))
            grammar = None
            if opts.schema is not None:
                try:
                    grammar = LlamaGrammar.from_json_schema(json.dumps(opts.schema), verbose=False)
                except Exception as exc:
                    raise UsageError(f"the JSON schema can't be turned into a grammar: {exc}") from None
            temperature = self.defaults["temperature"] if opts.temperature is None else opts.temperature
            stop = list(opts.stop if opts.stop is not None else self.prompt_spec.get("stop", []))
            text, finish, t_first = "", None, None
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
            else:
                completion = self.llama.create_completion(
                    prompt=prompt,
                    max_tokens=max_tokens,
                    temperature=temperature,
                    top_p=opts.top_p,
                    top_k=opts.top_k,
                    min_p=opts.min_p,
                    stream=True,
                    stop=stop,
                    grammar=grammar,
                    repeat_penalty=self.defaults["repeat_penalty"]
                    if opts.repeat_penalty is None
                    else opts.repeat_penalty,
                    seed=opts.seed if opts.seed is not None else 0,
                    # checked before each token is sampled: a cancel lands within one token even
                    # while the stream holds text back to match a stop string
                    stopping_criteria=StoppingCriteriaList(
                        [lambda ids, logits: bool(cancel and cancel.is_set())]
                    ),
                )
                for chunk in completion:
                    choice = chunk["choices"][0]
                    piece = choice["text"]
                    if t_first is None:
                        t_first = time.perf_counter()
                    if piece:
                        text += piece
                        yield Piece(piece, self.llama.n_tokens - n_prompt)
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
                        break
                    if cancel is not None and cancel.is_set():
                        finish = "cancelled"
                        break
                completion.close()
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
            t_end = time.perf_counter()
            # every sampled token but the last is evaluated; the last counts unless it was end-of-turn
            n_gen = self.llama.n_tokens - n_prompt + (1 if finish == "length" else 0)
            parsed, schema_errors = None, None
            if opts.schema is not None and finish == "stop":
                try:
                    parsed = json.loads(text)
                except ValueError:
                    parsed = None
                schema_errors = check_schema(parsed, opts.schema)
            gen_s = t_end - (t_first or t_end)
            timings = {
                "prompt_s": t_prompt - t0,
                "ttft_s": (t_first or t_end) - t0,
                "generate_s": gen_s,
                "total_s": t_end - t0,
                "prompt_tps": n_prompt / (t_prompt - t0) if t_prompt > t0 else 0.0,
                "generation_tps": (n_gen - 1) / gen_s if n_gen > 1 and gen_s > 0 else 0.0,
                **stats,
            }
            usage = {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}
            yield Piece(
                "",
                n_gen,
                finish_reason=finish or "stop",
                usage=usage,
                timings=timings,
                parsed=parsed,
                schema_errors=schema_errors,
            )
        finally:
            self._lock.release()

    def ask(
        self,
        question: str,
        *,
        images: Sequence[LoadedImage] = (),
        system: str | None = None,
        options: GenerateOptions | None = None,
        cancel: threading.Event | None = None,
        on_piece: Callable[[Piece], None] | None = None,
        progress: Progress | None = None,
    ) -> Answer:
        """Ask one question (with images) and return the whole answer."""
        messages = prompting.build_messages(question, images=len(images), system=system)
        text, last = "", None
        for piece in self.stream(messages, images=images, options=options, cancel=cancel, progress=progress):
            text += piece.text
            if on_piece:
                on_piece(piece)
            last = piece
        assert last is not None
        return Answer(
            text=text.strip(),
            finish_reason=last.finish_reason,
            usage=last.usage,
            timings=last.timings,
            model=dict(self.info),
            parsed=last.parsed,
            schema_errors=last.schema_errors,
            image_cache={
                "hits": last.timings["image_cache_hits"],
                "misses": last.timings["image_cache_misses"],
            },
        )


def resolve_bundle(path: str | os.PathLike | None) -> Path:
    """The bundle to use: the argument, else $MEDGEMMA_EDGE_BUNDLE."""
    chosen = path or os.environ.get("MEDGEMMA_EDGE_BUNDLE")
    if not chosen:
        raise UsageError(
            "no bundle given: pass -b BUNDLE or set MEDGEMMA_EDGE_BUNDLE (make demo builds models/bundles/demo)"
        )
    return Path(chosen)
