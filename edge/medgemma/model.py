"""MedGemma on the device: a bundle's GGUF through llama-cpp-python; images through an encoder.

The core is :meth:`MedGemma.stream`, a generator of :class:`Piece` (text, token counts,
timings, and on the last piece the finish reason and usage). ``ask`` joins it; the CLI, the
bridge and the server all consume the same generator. One instance serves one request at a
time (a lock); ``cancel`` (a ``threading.Event``) set from another thread stops the stream
within one token with finish reason ``cancelled``.

Images: an encoder (:mod:`edge.image_encoders`: the bundle's ONNX vision graph, or llama.cpp's
mmproj) turns an image into embeddings, which are kept in an :class:`~edge.image_cache.ImageCache`
and fed to llama.cpp with Gemma 3's positions and non-causal image attention
(:func:`edge.kv_prefix.decode_embeddings`). Between requests the KV cache is kept: a follow-up
question evaluates only what differs from the last conversation (:mod:`edge.kv_prefix`), so the
same image is neither encoded nor decoded again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from edge.bundle.gguf_header import read_header
from edge.bundle.manifest import Bundle, open_bundle
from edge.device import accel, resources
from edge.errors import Busy, ContextOverflow, InputError, ResourceError, UsageError
from edge.medgemma import kv_prefix, loading, prompting
from edge.medgemma.generation import DISCLAIMER, Answer, GenerateOptions, Piece, check_schema
from edge.medgemma.vision import MARKER, MmprojImageEncoder, OnnxImageEncoder
from edge.media.image_cache import ImageCache
from edge.media.images import LoadedImage

log = logging.getLogger(__name__)

__all__ = ["DISCLAIMER", "Answer", "GenerateOptions", "MedGemma", "Piece", "check_schema"]

_KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "q4_0": 2}  # ggml type ids
Progress = Callable[[str, int, int], None]  # (stage, done, total)
_IMAGE_POSITION_ID = 0  # what llama-cpp-python's token list holds at image positions


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
        vision: load an image encoder (if the bundle has one) so images can be asked about.
        image_cache: where encoded images are kept (default: a 512 MiB in-memory LRU).
        check_memory: refuse (ResourceError, exit 4) when the estimate exceeds free memory.
        image_encoder: ``auto`` (the bundle's ONNX encoder when it has one, else the mmproj),
            ``onnx`` or ``mmproj``. The ONNX path never loads the mmproj.
        repack: let llama.cpp keep a repacked copy of Q4 weights for faster CPU kernels (x86:
            ~1.5 GB more for the 4B model); off in the phone profiles.
        swa_full: keep a full-size cache for the sliding-window layers, so any earlier turn can be
            reused; off trims it to the window (less memory, less reuse).
        gpu_layers: layers to offload to a GPU (-1 all); 0 or no GPU build: CPU.
        image_gpu: run the ONNX image encoder with CUDA when onnxruntime can.
        mmproj_type: which mmproj (``f16``, ``q8_0``) when the bundle has several.
        keep_encoder: keep the ONNX image encoder open between images (off in the phone
            profiles: its memory is given back after each image).
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
        repack: bool = True,
        swa_full: bool = True,
        gpu_layers: int = 0,
        image_gpu: bool = False,
        mmproj_type: str | None = None,
        keep_encoder: bool = True,
    ):
        t0 = time.perf_counter()
        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
        comp = self.bundle.component("medgemma")
        text_entry = self.bundle.file("medgemma", "text", **({"quant": quant} if quant else {}))
        encoder_entry = (
            loading.choose_encoder(self.bundle, comp, image_encoder, mmproj_type) if vision else None
        )
        wanted = {text_entry["path"]} | ({encoder_entry["path"]} if encoder_entry else set())
        self.bundle.verify(component="medgemma", paths=wanted).raise_for_failure()
        if kv_type not in _KV_TYPES:
            raise UsageError(f"unknown KV cache type {kv_type!r} (one of {', '.join(_KV_TYPES)})")
        text_path = self.bundle.path(text_entry)
        header = read_header(text_path)
        self.memory_estimate = resources.estimate(
            text_path,
            header,
            encoder=self.bundle.path(encoder_entry) if encoder_entry else None,
            image_patches=loading.image_patches(comp, encoder_entry),
            n_ctx=n_ctx,
            kv_type=kv_type,
            repack=repack,
            swa_full=swa_full,
        )
        if check_memory:
            free = resources.available_memory()
            if self.memory_estimate.total > free:
                raise ResourceError(
                    f"this device has {free / 2**30:.2f} GiB free but {text_entry['path']} at context {n_ctx} "
                    f"needs about {self.memory_estimate.describe()}; use a smaller quantization, --ctx "
                    f"or a smaller --profile"
                )
        n_ctx_train = int(header.arch_key("context_length", n_ctx) or n_ctx)
        self.n_threads = n_threads or os.cpu_count() or 1
        loading.quiet_native_logs()
        accel.load_backends()
        self.llama = loading.load_llama(
            text_path,
            repack=repack,
            n_ctx=min(n_ctx, n_ctx_train),
            n_threads=self.n_threads,
            n_threads_batch=self.n_threads,
            flash_attn=flash_attn,
            use_mmap=use_mmap,
            seed=seed,
            type_k=_KV_TYPES[kv_type],
            type_v=_KV_TYPES[kv_type],
            swa_full=swa_full,
            n_gpu_layers=accel.llama_gpu_layers(gpu_layers),
            verbose=log.isEnabledFor(logging.DEBUG),
        )
        self.n_ctx = min(n_ctx, n_ctx_train, self.llama.n_ctx())  # llama.cpp may pad its own upwards
        self.n_embd = int(self.llama.n_embd())
        self.encoder = None
        if encoder_entry is not None:
            path = self.bundle.path(encoder_entry)
            if encoder_entry["role"] == "vision-onnx":
                self.encoder = OnnxImageEncoder(
                    path, encoder_entry, threads=self.n_threads, gpu=image_gpu, keep=keep_encoder
                )
            else:
                self.encoder = MmprojImageEncoder(
                    path,
                    encoder_entry,
                    self.llama.model,
                    threads=self.n_threads,
                    flash_attn=flash_attn,
                    gpu=gpu_layers != 0,
                )
        self.media_marker = MARKER if self.encoder is not None else None
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
        self._held: list = []  # identities of the positions the KV cache holds (see edge.kv_prefix)
        self._lock = threading.Lock()
        self.load_seconds = time.perf_counter() - t0
        self.info = {
            "bundle": str(self.bundle.root),
            "text": text_entry["path"],
            "quant": text_entry.get("quant"),
            "image_encoder": encoder_entry["path"] if encoder_entry else None,
            "n_ctx": self.n_ctx,
            "source": comp.get("source", {}).get("description") or comp.get("source", {}).get("model_id"),
            "synthetic": bool(comp.get("source", {}).get("synthetic")),
        }
        log.info(
            "loaded %s (%s) in %.2fs; image encoder %s; estimate %s",
            text_entry["path"],
            text_entry.get("quant"),
            self.load_seconds,
            self.info["image_encoder"],
            self.memory_estimate.describe(),
        )

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def close(self) -> None:
        if self.encoder is not None:
            self.encoder.close()
            self.encoder = None
        self.llama.close()

    def forget_context(self) -> None:
        """Forget what the KV cache holds: the next request evaluates its whole prompt (images
        then come from the embedding cache). For measurements and tests."""
        self._held = []

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
        return f"{image.key[:32]}-{self.encoder.entry['sha256'][:16]}"

    def _embeddings(self, image: LoadedImage, key: str, stats: dict) -> np.ndarray:
        """The image's embeddings: from the cache, else encoded now (and cached)."""
        embd = self.image_cache.get(key)
        if embd is not None:
            stats["image_cache_hits"] += 1
            return embd
        t0 = time.perf_counter()
        embd = self.encoder.encode(image, self.n_embd)
        self.image_cache.put(key, embd)
        stats["image_encode_s"] += time.perf_counter() - t0
        stats["image_cache_misses"] += 1
        log.info("encoded image %s with %s in %.2fs", key[:12], self.encoder.name, time.perf_counter() - t0)
        return embd

    def prepare_image(
        self,
        image: LoadedImage,
        *,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        wait: bool = True,
        prefill: bool = True,
    ) -> dict:
        """Get ready for a question about ``image`` before it is asked (say, while the user
        types): encode it into the cache and, with ``prefill``, also run the start of the
        conversation through the model (the user turn up to and including the image), so the
        question that follows evaluates only its own tokens. Returns ``{"key", "cached",
        "encode_s", "prefilled_tokens"}``."""
        if self.encoder is None:
            raise UsageError("this model has no image encoder: it can't take images")
        if not self._lock.acquire(blocking=wait):
            raise Busy("the model is answering another request; try again when it finishes")
        try:
            stats = {"image_encode_s": 0.0, "image_cache_hits": 0, "image_cache_misses": 0}
            key = self._image_key(image)
            if prefill:
                opening = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ""}]}]
                segments = self._conversation_segments(opening, [image])
                upto = next(i for i, s in enumerate(segments) if isinstance(s, kv_prefix.ImageSegment))
                self._evaluate(segments[: upto + 1], [image], cancel, progress, stats, need_logits=False)
            else:
                if progress:
                    progress("image", 0, 1)
                if cancel is None or not cancel.is_set():
                    self._embeddings(image, key, stats)
                    if progress:
                        progress("image", 1, 1)
            return {
                "key": key,
                "cached": stats["image_encode_s"] == 0.0,
                "encode_s": stats["image_encode_s"],
                "prefilled_tokens": len(self._held) if prefill else 0,
            }
        finally:
            self._lock.release()

    def _segments(self, text: str, images: Sequence[LoadedImage]) -> list[kv_prefix.Segment]:
        def tokenize(piece: str) -> list[int]:
            return self.llama.tokenize(piece.encode("utf-8"), add_bos=False, special=True)

        if self.media_marker is None:
            return [tokenize(text)]
        segments = kv_prefix.split_prompt(text, self.media_marker, tokenize)
        return [
            kv_prefix.ImageSegment(
                self._image_key(images[s.index]), self.encoder.tokens_for(images[s.index]), s.index
            )
            if isinstance(s, kv_prefix.ImageSegment)
            else s
            for s in segments
        ]

    def _conversation_segments(self, messages, images) -> list[kv_prefix.Segment]:
        text, n_markers = self.render(messages)
        if n_markers != len(images):
            raise UsageError(
                f"the conversation has {n_markers} image part(s) but {len(images)} image(s) were given"
            )
        return self._segments(text, images)

    def _prefill(self, messages, images, cancel, progress, stats) -> list[int]:
        """Render and evaluate a conversation; returns the prompt's token ids."""
        return self._evaluate(self._conversation_segments(messages, images), images, cancel, progress, stats)

    def _evaluate(self, segments, images, cancel, progress, stats, *, need_logits: bool = True) -> list[int]:
        """Check the context, then evaluate what the KV cache doesn't hold yet. Returns the
        prompt's token ids (image positions hold a placeholder id); [] when cancelled."""
        wanted = kv_prefix.identities(segments)
        self._check_context(len(wanted), len(images))
        keep = kv_prefix.reusable_prefix(self._held, wanted, keep_last=need_logits)
        ctx = self.llama._ctx.ctx
        if not kv_prefix.remove_from(ctx, keep):
            keep = 0
            self.llama._ctx.kv_cache_clear()
        self.llama.n_tokens = keep
        self._held = []  # until the prefill completes, what the cache holds is unknown
        stats["kv_reused_tokens"] = keep
        n_images = len(images)
        done_images, pos = 0, 0
        for seg in segments:
            if cancel is not None and cancel.is_set():
                return []
            if isinstance(seg, kv_prefix.ImageSegment):
                if pos < keep:  # held whole in the KV cache: nothing to encode or decode
                    stats["image_cache_hits"] += 1
                else:
                    if progress:
                        progress("image", done_images, n_images)
                    embd = self._embeddings(images[seg.index], seg.key, stats)
                    if cancel is not None and cancel.is_set():
                        return []
                    kv_prefix.decode_embeddings(ctx, embd, self.llama.n_tokens, n_batch=self.llama.n_batch)
                    self.llama.input_ids[pos : pos + seg.n_tokens] = _IMAGE_POSITION_ID
                    self.llama.n_tokens += seg.n_tokens
                done_images += 1
                if progress:
                    progress("image", done_images, n_images)
                pos += seg.n_tokens
                continue
            if pos + len(seg) > keep:
                self.llama.eval(seg[max(0, keep - pos) :])
            pos += len(seg)
        self._held = wanted
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
            held, self._held = self._held, []  # generating changes the cache; recorded again below
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
            if prompt:  # the cache now holds the prompt and the evaluated answer tokens
                self._held = held + self.llama.input_ids[len(prompt) : self.llama.n_tokens].tolist()
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
