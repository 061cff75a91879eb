"""MedGemma on the device: a bundle's GGUF through llama-cpp-python; images through an encoder.

The core is :meth:`MedGemma.stream`, a generator of :class:`Piece` (text, token counts,
timings, and on the last piece the finish reason and usage). ``ask`` joins it; the CLI, the
bridge and the server all consume the same generator. One instance serves one request at a
time (a lock); ``cancel`` (a ``threading.Event``) set from another thread stops the stream
within one token with finish reason ``cancelled``.

How it loads is a :class:`~edge.medgemma.settings.MedGemmaSettings`. Images: an encoder
(:mod:`edge.medgemma.vision`: the bundle's ONNX vision graph, or llama.cpp's mmproj) turns an
image into embeddings, which are kept in an :class:`~edge.media.image_cache.ImageCache` and fed
to llama.cpp with Gemma 3's positions and non-causal image attention
(:func:`edge.medgemma.llama_binding.decode_embeddings`). Between requests the KV cache is kept:
a follow-up question evaluates only what differs from the last conversation
(:mod:`edge.medgemma.kv_prefix`), so the same image is neither encoded nor decoded again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import numpy as np

from edge.bundle.gguf_header import read_header
from edge.bundle.manifest import Bundle, open_bundle
from edge.errors import Busy, ContextOverflow, InputError, UsageError
from edge.medgemma import kv_prefix, llama_binding, loading, prompting
from edge.medgemma.generation import DISCLAIMER, Answer, GenerateOptions, Piece, check_schema
from edge.medgemma.settings import MedGemmaSettings
from edge.medgemma.vision import MARKER
from edge.media.image_cache import ImageCache
from edge.media.images import LoadedImage

log = logging.getLogger(__name__)

__all__ = ["DISCLAIMER", "Answer", "GenerateOptions", "MedGemma", "MedGemmaSettings", "Piece", "check_schema"]

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class MedGemma:
    """A loaded MedGemma (or any Gemma 3 GGUF) from a bundle.

    Args:
        bundle: a bundle directory or an opened :class:`Bundle` with a ``medgemma`` component.
        settings: how to load and run it (default ``MedGemmaSettings()``; the fields say what
            each knob does).
        image_cache: where encoded images are kept (default: a 512 MiB in-memory LRU).
        **overrides: settings fields to change, e.g. ``n_ctx=512, image_encoder="mmproj"``
            (None leaves a field as it is).
    Raises:
        UsageError: an unknown setting or a value it does not allow.
        InputError / IntegrityError: missing component or file, hash mismatch (names the file).
        ResourceError: not enough memory for the model and context.
        MissingDependency: llama-cpp-python is missing or not the supported version.
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        settings: MedGemmaSettings | None = None,
        *,
        image_cache: ImageCache | None = None,
        **overrides: Any,
    ):
        t0 = time.perf_counter()
        self.settings = loading.resolve_settings(settings, overrides)
        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
        comp = self.bundle.component("medgemma")
        text_entry, encoder_entry = loading.choose_files(self.bundle, comp, self.settings)
        text_path = self.bundle.path(text_entry)
        header = read_header(text_path)
        self.memory_estimate, planned = loading.check_memory_with_encoder(
            self.bundle, comp, text_entry, encoder_entry, header, self.settings
        )
        self.llama, self.n_ctx, self.n_threads = loading.load_text_model(text_path, header, self.settings)
        self.n_embd = int(self.llama.n_embd())
        self.encoder = loading.load_image_encoder(
            self.bundle,
            encoder_entry,
            self.settings,
            llama=self.llama,
            threads=self.n_threads,
            planned=planned,
        )
        self._read_prompt_spec(comp)
        self.image_cache = image_cache if image_cache is not None else ImageCache()
        self._held: list = []  # identities of the positions the KV cache holds (see kv_prefix)
        self._lock = threading.Lock()
        self.load_seconds = time.perf_counter() - t0
        self.info = loading.describe(self.bundle, comp, text_entry, encoder_entry, self.n_ctx)
        log.info(
            "loaded %s (%s) in %.2fs; image encoder %s; estimate %s",
            text_entry["path"],
            text_entry.get("quant"),
            self.load_seconds,
            self.info["image_encoder"],
            self.memory_estimate.describe(),
        )

    def _read_prompt_spec(self, comp: dict) -> None:
        """The chat template and sampling defaults: the manifest's, else the GGUF's template."""
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

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Whether a request holds the model now."""
        return self._lock.locked()

    def close(self) -> None:
        """Free the image encoder and the llama.cpp model."""
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

    @contextlib.contextmanager
    def _acquire(self, wait: bool) -> Iterator[None]:
        if not self._lock.acquire(blocking=wait):
            raise Busy("the model is answering another request; try again when it finishes")
        try:
            yield
        finally:
            self._lock.release()

    # -- prompt -----------------------------------------------------------------------------------

    def render(self, messages: list[dict]) -> tuple[str, int]:
        """The conversation as prompt text (chat template applied; an image marker where each
        image goes) and the number of images it takes."""
        msgs, n_images = prompting.normalize(messages, self.media_marker)
        bos = self.llama.detokenize([self.llama.token_bos()], special=True).decode("utf-8", "ignore")
        eos = self.llama.detokenize([self.llama.token_eos()], special=True).decode("utf-8", "ignore")
        return prompting.render(self.template, msgs, bos_token=bos, eos_token=eos), n_images

    def segments(self, text: str, images: Sequence[LoadedImage]) -> list[kv_prefix.Segment]:
        """Rendered prompt ``text`` → its segments: token ids for text (tokenized as libmtmd
        does), an :class:`~edge.medgemma.kv_prefix.ImageSegment` (key, length) per image."""

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

    def evaluate(
        self,
        messages: list[dict],
        *,
        images: Sequence[LoadedImage] = (),
        cancel: threading.Event | None = None,
        progress: Progress | None = None,
        wait: bool = True,
    ) -> list[int]:
        """Render and evaluate ``messages`` without generating (what a request does before its
        first token): afterwards :meth:`last_logits` are the next token's. Returns the prompt's
        token ids (image positions hold a placeholder id); [] when cancelled.

        Raises:
            Busy: another request holds the model and ``wait`` is False.
            ContextOverflow: the prompt does not fit the context.
        """
        with self._acquire(wait):
            return self._prefill(messages, images, cancel, progress, _new_stats())

    def last_logits(self) -> np.ndarray:
        """The logits ([n_vocab] float32) after the last evaluated position (a copy)."""
        return llama_binding.last_logits(self.llama)

    def evaluated_tokens(self) -> list[int]:
        """The token ids at every position evaluated so far: the last prompt, then the answer
        tokens evaluated while generating (image positions hold a placeholder id)."""
        return llama_binding.evaluated_ids(self.llama)

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
        with self._acquire(wait):
            stats = _new_stats()
            key = self._image_key(image)
            if prefill:
                opening = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ""}]}]
                segments = self._conversation_segments(opening, [image])
                upto = next(i for i, s in enumerate(segments) if isinstance(s, kv_prefix.ImageSegment))
                self._evaluate(segments[: upto + 1], [image], cancel, progress, stats, need_logits=False)
            else:
                if progress:
                    progress("image", 0, 1)
                if not _is_set(cancel):
                    self._embeddings(image, key, stats)
                    if progress:
                        progress("image", 1, 1)
            return {
                "key": key,
                "cached": stats["image_encode_s"] == 0.0,
                "encode_s": stats["image_encode_s"],
                "prefilled_tokens": len(self._held) if prefill else 0,
            }

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

    def _conversation_segments(self, messages, images) -> list[kv_prefix.Segment]:
        text, n_markers = self.render(messages)
        if n_markers != len(images):
            raise UsageError(
                f"the conversation has {n_markers} image part(s) but {len(images)} image(s) were given"
            )
        return self.segments(text, images)

    def _prefill(self, messages, images, cancel, progress, stats) -> list[int]:
        """Render and evaluate a conversation; returns the prompt's token ids."""
        return self._evaluate(self._conversation_segments(messages, images), images, cancel, progress, stats)

    def _evaluate(self, segments, images, cancel, progress, stats, *, need_logits: bool = True) -> list[int]:
        """Check the context, then evaluate what the KV cache doesn't hold yet. Returns the
        prompt's token ids (image positions hold a placeholder id); [] when cancelled."""
        wanted = kv_prefix.identities(segments)
        self._check_context(len(wanted), len(images))
        reusable = kv_prefix.reusable_prefix(self._held, wanted, keep_last=need_logits)
        keep = llama_binding.keep_prefix(self.llama, reusable)
        self._held = []  # until the prefill completes, what the cache holds is unknown
        stats["kv_reused_tokens"] = keep
        done_images, pos = 0, 0
        for seg in segments:
            if _is_set(cancel):
                return []
            if not isinstance(seg, kv_prefix.ImageSegment):
                if pos + len(seg) > keep:
                    self.llama.eval(seg[max(0, keep - pos) :])
                pos += len(seg)
                continue
            if pos < keep:  # held whole in the KV cache: nothing to encode or decode
                stats["image_cache_hits"] += 1
            else:
                if progress:
                    progress("image", done_images, len(images))
                embd = self._embeddings(images[seg.index], seg.key, stats)
                if _is_set(cancel):
                    return []
                llama_binding.decode_embeddings(self.llama, embd)
            done_images += 1
            if progress:
                progress("image", done_images, len(images))
            pos += seg.n_tokens
        self._held = wanted
        return llama_binding.evaluated_ids(self.llama)

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
        opts = options or GenerateOptions()
        with self._acquire(wait):
            t0 = time.perf_counter()
            stats = _new_stats()
            prompt = self._prefill(messages, images, cancel, progress, stats)
            held, self._held = self._held, []  # generating changes the cache; recorded again below
            t_prompt = time.perf_counter()
            sampling = self._sampling(opts, len(prompt), cancel)
            text, finish, t_first = yield from self._generate(prompt, sampling, cancel)
            t_end = time.perf_counter()
            if prompt:  # the cache now holds the prompt and the evaluated answer tokens
                self._held = held + llama_binding.evaluated_ids(self.llama)[len(prompt) :]
            times = {"t0": t0, "t_prompt": t_prompt, "t_first": t_first, "t_end": t_end}
            yield self._last_piece(len(prompt), opts, text, finish, stats, times)

    def _sampling(self, opts: GenerateOptions, n_prompt: int, cancel: threading.Event | None) -> dict:
        """``create_completion``'s sampling arguments: the options, else the bundle's defaults."""
        from llama_cpp import StoppingCriteriaList

        max_tokens = opts.max_tokens or int(self.defaults["max_tokens"])
        return {
            "max_tokens": max(1, min(max_tokens, self.n_ctx - n_prompt)),
            "grammar": _grammar(opts.schema),
            "temperature": self.defaults["temperature"] if opts.temperature is None else opts.temperature,
            "stop": list(opts.stop if opts.stop is not None else self.prompt_spec.get("stop", [])),
            "top_p": opts.top_p,
            "top_k": opts.top_k,
            "min_p": opts.min_p,
            "repeat_penalty": self.defaults["repeat_penalty"]
            if opts.repeat_penalty is None
            else opts.repeat_penalty,
            "seed": opts.seed if opts.seed is not None else 0,
            # checked before each token is sampled: a cancel lands within one token even while
            # the stream holds text back to match a stop string
            "stopping_criteria": StoppingCriteriaList([lambda ids, logits: _is_set(cancel)]),
        }

    def _generate(
        self, prompt: list[int], sampling: dict, cancel: threading.Event | None
    ) -> Generator[Piece, None, tuple[str, str | None, float | None]]:
        """The token loop: yields a Piece per piece of text; returns (the whole text, the finish
        reason or None, when the first chunk came or None)."""
        if _is_set(cancel):
            return "", "cancelled", None
        n_prompt, text, finish, t_first = len(prompt), "", None, None
        completion = self.llama.create_completion(prompt=prompt, stream=True, **sampling)
        for chunk in completion:
            choice = chunk["choices"][0]
            if t_first is None:
                t_first = time.perf_counter()
            if choice["text"]:
                text += choice["text"]
                yield Piece(choice["text"], llama_binding.n_evaluated(self.llama) - n_prompt)
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
                break
            if _is_set(cancel):
                finish = "cancelled"
                break
        completion.close()
        if _is_set(cancel):
            finish = "cancelled"
        return text, finish, t_first

    def _last_piece(
        self, n_prompt: int, opts: GenerateOptions, text: str, finish: str | None, stats: dict, times: dict
    ) -> Piece:
        """The closing piece: finish reason, usage, timings and (with a schema) the parsed answer."""
        # every sampled token but the last is evaluated; the last counts unless it was end-of-turn
        n_gen = llama_binding.n_evaluated(self.llama) - n_prompt + (1 if finish == "length" else 0)
        parsed, schema_errors = None, None
        if opts.schema is not None and finish == "stop":
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
            schema_errors = check_schema(parsed, opts.schema)
        return Piece(
            "",
            n_gen,
            finish_reason=finish or "stop",
            usage={"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen},
            timings=_timings(n_prompt, n_gen, stats, **times),
            parsed=parsed,
            schema_errors=schema_errors,
        )

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


def _new_stats() -> dict:
    return {"image_encode_s": 0.0, "image_cache_hits": 0, "image_cache_misses": 0}


def _is_set(cancel: threading.Event | None) -> bool:
    return cancel is not None and cancel.is_set()


def _grammar(schema: dict | None):
    """llama.cpp's grammar for a JSON schema (None without one)."""
    if schema is None:
        return None
    from llama_cpp import LlamaGrammar

    try:
        return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
    except Exception as exc:
        raise UsageError(f"the JSON schema can't be turned into a grammar: {exc}") from None


def _timings(
    n_prompt: int, n_gen: int, stats: dict, *, t0: float, t_prompt: float, t_first: float | None, t_end: float
) -> dict:
    """Seconds and rates of one request (``prompt_s``, ``ttft_s``, ``generation_tps``, ...)."""
    gen_s = t_end - (t_first or t_end)
    return {
        "prompt_s": t_prompt - t0,
        "ttft_s": (t_first or t_end) - t0,
        "generate_s": gen_s,
        "total_s": t_end - t0,
        "prompt_tps": n_prompt / (t_prompt - t0) if t_prompt > t0 else 0.0,
        "generation_tps": (n_gen - 1) / gen_s if n_gen > 1 and gen_s > 0 else 0.0,
        **stats,
    }
