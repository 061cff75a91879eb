"""The one core every transport wraps: ``Bridge.handle(request, emit)``.

``handle`` runs a request to completion on the calling thread and reports through ``emit``
(one call per reply, in order): events, then a ``result`` or an ``error``, then exactly one
``done``. Transports call it from a thread per request, so ``cancel`` and ``health`` are
answered while a generation runs.

Concurrency: requests run on a small pool of worker threads (8 by default; at most one of
them generates, the others answer health, cancel and MedSigLIP ops). One generation at a time. A ``generate`` that arrives while another runs gets
``busy`` (with ``retry_after``) at once rather than waiting in a queue: a device serves one
user, a queue would hide the wait from the app and make cancel harder to reason about. The
MedSigLIP ops don't take MedGemma's lock and run alongside a generation.

Cancel: every running request has a ``threading.Event``; ``cancel`` sets the target's event
and the target then ends with ``done(cancelled)`` and no result, whatever point it had
reached (a generation stops within one token; other ops drop their result).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from android_bridge import media
from android_bridge.pictures import THUMBNAIL_SIDES, Thumbnails
from android_bridge.protocol import (
    OPS,
    VERSION,
    ProtocolError,
    Request,
    done,
    error,
    error_from_exception,
    event,
    parse_request,
    request_id,
    result,
)
from android_bridge.runtime import RETRY_AFTER_S, Runtime, classification
from edge import __version__
from edge.errors import Busy, EdgeError

log = logging.getLogger(__name__)
Emit = Callable[[dict], None]
MAX_K = 100


@dataclass
class Context:
    """One running request: its id and params, its emitter and its cancel flag."""

    req: Request
    emit: Emit
    cancel: threading.Event
    after: list[Callable[[], None]] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.req.id

    def event(self, kind: str, **fields: Any) -> None:
        self.emit(event(self.id, kind, **fields))


@dataclass
class Outcome:
    value: dict | None
    finish_reason: str = "stop"
    usage: dict | None = None
    timings: dict = field(default_factory=dict)


class Bridge:
    """Requests in, replies out, over a :class:`Runtime`."""

    def __init__(self, runtime: Runtime, *, allow_paths: bool = True, workers: int = 8):
        self.runtime = runtime
        self.allow_paths = allow_paths
        self.transports: list[str] = ["in-process"]
        self.shutdown_hooks: list[Callable[[], None]] = []
        self.shutting_down = threading.Event()
        self._active: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self.thumbnails = Thumbnails()
        # Transports run requests on these long-lived threads rather than a thread per request:
        # with a fresh thread each time, glibc handed out new malloc arenas and RSS crept up.
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bridge")

    def submit(self, raw: Any, emit: Emit, then: Callable[[], None] | None = None) -> Future:
        """Run ``handle(raw, emit)`` on the bridge's worker threads; ``then()`` runs after it."""

        def run() -> None:
            try:
                self.handle(raw, emit)
            finally:
                if then is not None:
                    then()

        return self._pool.submit(run)

    # -- the core ----------------------------------------------------------------------------

    def handle(self, raw: Any, emit: Emit) -> str:
        """Run one request (bytes, str or dict); replies go to ``emit``. Returns the finish reason."""
        t0 = time.perf_counter()
        safe = _SafeEmit(emit)
        try:
            req = parse_request(raw)
        except ProtocolError as exc:
            rid = request_id(raw)
            safe(error(rid, exc.code, str(exc)))
            safe(done(rid, "error"))
            log.info("bridge: rejected request %s (%s)", rid, exc.code)
            return "error"
        cancel = threading.Event()
        safe.on_failure = cancel.set  # a client that went away cancels its request
        with self._lock:
            duplicate = req.id in self._active
            if not duplicate:
                self._active[req.id] = cancel
        if duplicate:
            safe(error(req.id, "invalid_request", f"request id {req.id!r} is already running"))
            safe(done(req.id, "error"))
            return "error"
        ctx = Context(req, safe, cancel)
        outcome, failure = None, None
        try:
            if self.shutting_down.is_set() and req.op not in ("health", "cancel"):
                raise ProtocolError("not_loaded", "the runtime is shutting down")
            outcome = getattr(self, f"_op_{req.op}")(ctx)
        except Exception as exc:
            failure = exc
            if not isinstance(exc, EdgeError):
                log.exception("bridge: %s %s failed", req.id, req.op)
        finally:
            with self._lock:
                cancelled = cancel.is_set()
                del self._active[req.id]
        total = {"total_s": time.perf_counter() - t0}
        if cancelled:
            finish = "cancelled"
            safe(done(req.id, finish, usage=outcome.usage if outcome else None, timings=total))
        elif failure is not None:
            finish = "error"
            safe(error_from_exception(req.id, failure))
            safe(done(req.id, finish, timings=total))
        else:
            finish = outcome.finish_reason
            if outcome.value is not None:
                safe(result(req.id, outcome.value))
            safe(done(req.id, finish, usage=outcome.usage, timings={**outcome.timings, **total}))
        code = getattr(failure, "code", "") if failure else ""
        log.info(
            "bridge: %s %s -> %s%s in %.3fs",
            req.id,
            req.op,
            finish,
            f" ({code})" if code else "",
            total["total_s"],
        )
        for hook in ctx.after:
            hook()
        return finish

    def cancel(self, target: str) -> bool:
        """Cancel a running request by id. True when it was running (it will end cancelled)."""
        with self._lock:
            ev = self._active.get(target)
            if ev is not None:
                ev.set()
            return ev is not None

    def cancel_all(self) -> int:
        with self._lock:
            for ev in self._active.values():
                ev.set()
            return len(self._active)

    @property
    def active(self) -> int:
        return len(self._active)

    def shutdown(self, *, grace_s: float = 10.0) -> None:
        """Refuse new work, cancel what runs, wait up to ``grace_s`` for it, close the models."""
        self.shutting_down.set()
        self.cancel_all()
        deadline = time.monotonic() + grace_s
        while self._active and time.monotonic() < deadline:
            time.sleep(0.02)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.runtime.close()

    def preload(self, names: list[str]) -> threading.Thread:
        """Load models in the background; requests meanwhile get ``loading`` with retry_after."""

        def run() -> None:
            for name in names:
                try:
                    self.runtime.load(name)
                except Exception as exc:  # kept in the slot's state for health
                    log.warning("bridge: preloading %s failed: %s", name, exc)

        for name in names:  # visible as loading before the thread runs
            slot = self.runtime.slots[name]
            if slot.model is None:
                slot.state = "loading"
        t = threading.Thread(target=run, name="bridge-preload", daemon=True)
        t.start()
        return t

    # -- ops -------------------------------------------------------------------------------------

    def _op_health(self, ctx: Context) -> Outcome:
        rt = self.runtime
        return Outcome(
            {
                "protocol": VERSION,
                "versions": _versions(),
                "capabilities": {
                    "ops": list(OPS),
                    "transports": list(self.transports),
                    "concurrency": "busy",
                    "images": getattr(rt.slots["medgemma"].model, "media_marker", None) is not None,
                    "image_sources": ["base64", "data_url"] + (["path"] if self.allow_paths else []),
                    "medgemma": rt.available("medgemma"),
                    "medsiglip": rt.available("medsiglip"),
                    "index": rt.index is not None or rt.index_dir is not None,
                },
                "models": rt.states(),
                "active_requests": self.active,
                "shutting_down": self.shutting_down.is_set(),
            }
        )

    def _model_param(self, ctx: Context) -> str:
        name = ctx.req.params.get("model", "medgemma")
        if name not in self.runtime.slots:
            raise ProtocolError("invalid_request", f"unknown model {name!r}; medgemma or medsiglip")
        return name

    def _op_load(self, ctx: Context) -> Outcome:
        name = self._model_param(ctx)
        options = ctx.req.params.get("options") or {}
        self.runtime.settings_for(name, options)  # a bad option fails here, before "loading"
        slot = self.runtime.slots[name]
        if slot.model is None:
            ctx.event("state", model=name, state="loading")
        last = [0.0]

        def progress(stage: str, n: int, total: int) -> None:
            now = time.monotonic()
            if n in (0, total) or now - last[0] > 0.2:  # at most ~5 events a second
                last[0] = now
                ctx.event("progress", stage=stage, done=n, total=total)

        try:
            state = self.runtime.load(name, options=options, progress=progress)
        except ProtocolError:
            raise
        except Exception:
            ctx.event("state", model=name, state="error")
            raise
        ctx.event("state", model=name, state=state["state"])
        return Outcome({"model": name, **state})

    def _op_unload(self, ctx: Context) -> Outcome:
        name = self._model_param(ctx)
        return Outcome({"model": name, **self.runtime.unload(name)})

    def _op_generate(self, ctx: Context) -> Outcome:
        from edge.medgemma.model import DISCLAIMER

        model = self.runtime.require("medgemma")
        messages, images = media.conversation(ctx.req.params, allow_paths=self.allow_paths)
        options = media.generate_options(ctx.req.params)

        def progress(stage: str, n: int, total: int) -> None:
            ctx.event("progress", stage=stage, done=n, total=total)

        text, last = "", None
        try:
            stream = model.stream(
                messages, images=images, options=options, cancel=ctx.cancel, progress=progress, wait=False
            )
            for piece in stream:
                if piece.text:
                    text += piece.text
                    ctx.event("token", text=piece.text, n_tokens=piece.n_tokens)
                last = piece
        except Busy as exc:
            raise ProtocolError("busy", str(exc), retry_after=RETRY_AFTER_S) from None
        value = {"text": text, "disclaimer": DISCLAIMER, "model": dict(model.info)}
        if options.schema is not None:
            value |= {"parsed": last.parsed, "schema_errors": last.schema_errors}
        return Outcome(value, last.finish_reason, last.usage, dict(last.timings))

    def _op_prepare_image(self, ctx: Context) -> Outcome:
        """Encode images for MedGemma ahead of the question (a page starts this when an image
        is dropped, while the user types); a later generate with them hits the image cache."""
        model = self.runtime.require("medgemma")
        prepare = getattr(model, "prepare_image", None)
        if prepare is None:
            raise ProtocolError(
                "not_loaded", "this MedGemma can't encode images ahead; generate encodes them"
            )
        images = [media.load(src, allow_paths=self.allow_paths) for src in media.image_list(ctx.req.params)]
        stats = {"image_encode_s": 0.0, "image_cache_hits": 0, "image_cache_misses": 0}
        out = []
        for i, image in enumerate(images):

            def progress(stage: str, n: int, total: int, i: int = i) -> None:
                ctx.event("progress", stage="image", done=i * total + n, total=len(images) * total)

            try:
                # the first image also prefills the conversation's opening (see MedGemma.prepare_image)
                got = prepare(image, progress=progress, cancel=ctx.cancel, wait=False, prefill=i == 0)
            except Busy as exc:
                raise ProtocolError("busy", str(exc), retry_after=RETRY_AFTER_S) from None
            if ctx.cancel.is_set():
                break
            out.append({"cached": bool(got["cached"]), "encode_s": float(got["encode_s"])})
            stats["image_encode_s"] += out[-1]["encode_s"]
            stats["image_cache_hits" if out[-1]["cached"] else "image_cache_misses"] += 1
        return Outcome({"images": out}, timings=stats)

    def _op_embed_image(self, ctx: Context) -> Outcome:
        encoder = self.runtime.require("medsiglip")
        images = [media.load(src, allow_paths=self.allow_paths) for src in media.image_list(ctx.req.params)]

        def progress(n: int, total: int) -> None:
            ctx.event("progress", stage="embed", done=n, total=total)

        return Outcome(_embeddings(encoder.embed_images(images, cancel=ctx.cancel, progress=progress)))

    def _op_embed_text(self, ctx: Context) -> Outcome:
        encoder = self.runtime.require("medsiglip")
        texts = ctx.req.params.get("texts", [ctx.req.params["text"]] if "text" in ctx.req.params else None)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ProtocolError("invalid_request", "embed_text needs 'texts': a non-empty list of strings")
        return Outcome(_embeddings(encoder.embed_texts(texts, cancel=ctx.cancel)))

    def _op_classify(self, ctx: Context) -> Outcome:
        encoder = self.runtime.require("medsiglip")
        p = ctx.req.params
        labels = p.get("labels")
        if labels is not None and (
            not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)
        ):
            raise ProtocolError("invalid_request", "labels must be a list of strings")
        label_set = p.get("label_set")
        if label_set is not None and not isinstance(label_set, str):
            raise ProtocolError("invalid_request", "label_set must be a string")
        image = media.load(media.one_image(p), allow_paths=self.allow_paths)
        out = classification(encoder.classify(image, labels=labels or None, label_set=label_set))
        best = max(range(len(out["scores"])), key=out["scores"].__getitem__)
        return Outcome({**out, "top": {"label": out["labels"][best], "score": out["scores"][best]}})

    def _op_search_similar(self, ctx: Context) -> Outcome:
        p = ctx.req.params
        k = p.get("k", 5)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise ProtocolError("invalid_request", f"k must be an integer from 1 to {MAX_K}")
        index = self.runtime.require_index()
        encoder = self.runtime.require("medsiglip")
        side = p.get("thumbnails")
        lo, hi = THUMBNAIL_SIDES
        if side is not None and (isinstance(side, bool) or not isinstance(side, int) or not lo <= side <= hi):
            raise ProtocolError("invalid_request", f"thumbnails must be a size in pixels from {lo} to {hi}")
        if isinstance(p.get("text"), str):
            hits = index.search_text(p["text"], encoder=encoder, k=k)
        else:
            image = media.load(media.one_image(p), allow_paths=self.allow_paths)
            hits = index.search_image(image, encoder=encoder, k=k)
        matches = [_entry(e) for e in hits]
        if side:
            for m, e in zip(matches, hits, strict=True):
                m["thumbnail"] = self.thumbnails.get(m["content"], str(_field(e, "content_hash") or ""), side)
        return Outcome({"matches": matches})

    def _op_cancel(self, ctx: Context) -> Outcome:
        target = ctx.req.params.get("target")
        if not isinstance(target, str) or target == ctx.id:
            raise ProtocolError("invalid_request", "cancel needs 'target': the id of another request")
        return Outcome({"target": target, "found": self.cancel(target)})

    def _op_shutdown(self, ctx: Context) -> Outcome:
        self.shutting_down.set()  # refuse new work from now on, before this reply is sent

        def stop() -> None:  # after this request's done: cancel the rest, stop the transports
            self.cancel_all()
            for hook in self.shutdown_hooks:
                hook()

        ctx.after.append(stop)
        return Outcome({"shutting_down": True, "active_requests": self.active - 1})


def _versions() -> dict:
    """Package versions from their metadata: importing llama_cpp or onnxruntime here, while a
    background load imports them too, could deadlock two threads in the dynamic loader."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"runtime": __version__}
    for key, dist in (("llama_cpp_python", "llama-cpp-python"), ("onnxruntime", "onnxruntime")):
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            out[key] = None
    return out


class _SafeEmit:
    """An emitter that never raises into the op: a failed write marks the client gone."""

    def __init__(self, emit: Emit):
        self.emit = emit
        self.on_failure: Callable[[], None] | None = None
        self.failed = False

    def __call__(self, msg: dict) -> None:
        if self.failed:
            return
        try:
            self.emit(msg)
        except Exception as exc:
            self.failed = True
            log.info("bridge: client went away (%s); cancelling %s", type(exc).__name__, msg.get("id"))
            if self.on_failure:
                self.on_failure()


def _embeddings(rows) -> dict:
    return {
        "embeddings": [[float(x) for x in r] for r in rows],
        "dim": int(rows.shape[1]) if len(rows) else 0,
    }


def _field(e: Any, key: str) -> Any:
    return e.get(key) if isinstance(e, dict) else getattr(e, key, None)


def _entry(e: Any) -> dict:
    return {
        "id": str(_field(e, "id")),
        "score": float(_field(e, "score")),
        "content": _field(e, "content"),
        "metadata": _field(e, "metadata") or {},
    }


def call(bridge: Bridge, request: Any) -> list[dict]:
    """The in-process transport: run ``request`` and return its replies, ``done`` last."""
    out: list[dict] = []
    bridge.handle(request, out.append)
    return out


def bridge_for(settings) -> Bridge:
    """A bridge over ``settings``' bundle(s) (android_bridge.settings.ServeSettings), with its
    models preloading in the background (``health`` shows them loading)."""
    runtime = Runtime(
        settings.bundle,
        medsiglip_bundle=settings.medsiglip_bundle,
        index_dir=settings.index,
        medgemma_settings=settings.medgemma,
        medsiglip_settings=settings.medsiglip,
        image_cache=settings.image_cache,
    )
    bridge = Bridge(runtime, allow_paths=settings.allow_paths)
    bridge.preload([n for n in settings.preload if runtime.available(n)])
    return bridge
