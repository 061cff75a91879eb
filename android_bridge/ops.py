"""The protocol's ops, one function each: ``op_<name>(bridge, ctx) -> Outcome``.

:class:`~android_bridge.bridge.Bridge` parses, checks and tracks a request, then runs the op's
function from :data:`HANDLERS`; what an op reads from ``params`` was already checked against
:mod:`android_bridge.params`. An op reports progress through ``ctx.event`` and returns its
result as an :class:`Outcome`; an exception is turned into a typed error by the bridge.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from android_bridge import media
from android_bridge.pictures import THUMBNAIL_SIDES
from android_bridge.protocol import LAN_OPS, OPS, VERSION, ProtocolError
from android_bridge.runtime import RETRY_AFTER_S, classification
from edge import __version__
from edge.errors import Busy

if TYPE_CHECKING:
    from android_bridge.bridge import Bridge, Context


@dataclass
class Outcome:
    value: dict | None
    finish_reason: str = "stop"
    usage: dict | None = None
    timings: dict = field(default_factory=dict)


def op_health(bridge: Bridge, ctx: Context) -> Outcome:
    rt = bridge.runtime
    return Outcome(
        {
            "protocol": VERSION,
            "versions": _versions(),
            "capabilities": {
                "ops": list(OPS) + (list(LAN_OPS) if bridge.lan is not None else []),
                "transports": list(bridge.transports),
                "concurrency": "busy" if bridge.lan is None else "queue",
                "images": getattr(rt.slots["medgemma"].model, "media_marker", None) is not None,
                "image_sources": ["base64", "data_url"]
                + (["path"] if ctx.allow_paths else [])
                + (["study"] if rt.studies is not None else []),
                "medgemma": rt.available("medgemma"),
                "medsiglip": rt.available("medsiglip"),
                "index": rt.index is not None or rt.index_dir is not None,
                "studies": rt.studies is not None,
                "reports": rt.reports is not None,
                "dicom": bridge.dicom,  # the DICOM node receiving studies: {ae_title, port, host} | None
                "delivery": _destinations(rt.delivery),  # where send_report delivers by default
            },
            "models": rt.states(),
            "active_requests": bridge.active,
            "shutting_down": bridge.shutting_down.is_set(),
            **({"lan": bridge.lan.health()} if bridge.lan is not None else {}),
        }
    )


def _destinations(delivery: Any) -> list[dict]:
    """The configured report destinations (PACS, FHIR endpoint), the default first."""
    if delivery is None:
        return []
    kinds = [delivery.default] + [k for k in ("dicom", "fhir") if k != delivery.default]
    configured = {"dicom": delivery.pacs, "fhir": delivery.fhir_url}
    return [delivery.destination(k) for k in kinds if configured[k] is not None]


def _model_param(bridge: Bridge, ctx: Context) -> str:
    name = ctx.req.params.get("model") or "medgemma"  # its type and value: params.check
    if name not in bridge.runtime.slots:
        raise ProtocolError("invalid_request", f"unknown model {name!r}; medgemma or medsiglip")
    return name


def op_load(bridge: Bridge, ctx: Context) -> Outcome:
    name = _model_param(bridge, ctx)
    options = ctx.req.params.get("options") or {}
    bridge.runtime.settings_for(name, options)  # a bad option fails here, before "loading"
    slot = bridge.runtime.slots[name]
    if slot.model is None:
        ctx.event("state", model=name, state="loading")
    last = [0.0]

    def progress(stage: str, n: int, total: int) -> None:
        now = time.monotonic()
        if n in (0, total) or now - last[0] > 0.2:  # at most ~5 events a second
            last[0] = now
            ctx.event("progress", stage=stage, done=n, total=total)

    try:
        state = bridge.runtime.load(name, options=options, progress=progress)
    except ProtocolError:
        raise
    except Exception:
        ctx.event("state", model=name, state="error")
        raise
    ctx.event("state", model=name, state=state["state"])
    return Outcome({"model": name, **state})


def op_unload(bridge: Bridge, ctx: Context) -> Outcome:
    name = _model_param(bridge, ctx)
    return Outcome({"model": name, **bridge.runtime.unload(name)})


@contextlib.contextmanager
def _turn(bridge: Bridge, ctx: Context):
    """MedGemma's turn for this request: at once on a device (a second generation gets busy
    from the model), in FIFO order with ``queued`` events in LAN mode (android_bridge.lan.queue).
    Yields False when the request was cancelled while it waited. The request's time limit
    (android_bridge.bridge.Deadline) stops while it waits and starts again, whole, at its turn:
    a tablet is not timed out for standing in line (the queue's bound limits that wait)."""
    if bridge.lan is None:
        yield True
        return

    def waiting(position: int, eta: float) -> None:
        ctx.event("queued", position=position, estimated_wait_s=eta)

    clock = ctx.cancel if hasattr(ctx.cancel, "restart") else None
    if clock is not None:
        clock.pause()
    try:
        with bridge.lan.queue.turn(ctx.cancel, waiting) as got:
            if clock is not None:
                clock.restart()
                clock = None
            yield got
    finally:
        if clock is not None:  # busy (the queue full) or a failure: the clock runs again
            clock.restart()


def op_generate(bridge: Bridge, ctx: Context) -> Outcome:
    model = bridge.runtime.require("medgemma")
    options = _capped(bridge, media.generate_options(ctx.req.params), model)
    messages, images = media.conversation(ctx.req.params, allow_paths=ctx.allow_paths, budget=ctx.budget)
    with _turn(bridge, ctx) as got:
        if not got:  # cancelled while it waited: the bridge ends it with done(cancelled)
            return Outcome(None, "cancelled")
        return _generate(ctx, model, options, messages, images)


def _generate(ctx: Context, model: Any, options: media.GenerateOptions, messages, images) -> Outcome:
    from edge.medgemma.model import DISCLAIMER

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


def _capped(bridge: Bridge, options: media.GenerateOptions, model: Any) -> media.GenerateOptions:
    """``options`` with max_tokens cut to the server's per-request token limit (the answer then
    ends with finish_reason ``length``, as any answer cut by max_tokens does)."""
    cap = bridge.limits.max_request_tokens
    wanted = options.max_tokens
    if wanted is None:
        wanted = (getattr(model, "defaults", None) or {}).get("max_tokens")
    if isinstance(wanted, int) and wanted > cap:
        return dataclasses.replace(options, max_tokens=cap)
    return options


def _images(bridge: Bridge, ctx: Context) -> list:
    """The op's image sources, decoded within the request's image budget."""
    srcs = media.image_list(ctx.req.params)
    ctx.budget.expect(len(srcs))
    return [ctx.budget.load(src, allow_paths=ctx.allow_paths) for src in srcs]


def op_prepare_image(bridge: Bridge, ctx: Context) -> Outcome:
    """Encode images for MedGemma ahead of the question (a page starts this when an image
    is dropped, while the user types); a later generate with them hits the image cache."""
    model = bridge.runtime.require("medgemma")
    prepare = getattr(model, "prepare_image", None)
    if prepare is None:
        raise ProtocolError("not_loaded", "this MedGemma can't encode images ahead; generate encodes them")
    images = _images(bridge, ctx)
    with _turn(bridge, ctx) as got:
        if not got:
            return Outcome(None, "cancelled")
        return _prepare(ctx, prepare, images)


def _prepare(ctx: Context, prepare: Any, images: list) -> Outcome:
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


def op_embed_image(bridge: Bridge, ctx: Context) -> Outcome:
    encoder = bridge.runtime.require("medsiglip")
    images = _images(bridge, ctx)

    def progress(n: int, total: int) -> None:
        ctx.event("progress", stage="embed", done=n, total=total)

    return Outcome(_embeddings(encoder.embed_images(images, cancel=ctx.cancel, progress=progress)))


def op_embed_text(bridge: Bridge, ctx: Context) -> Outcome:
    encoder = bridge.runtime.require("medsiglip")
    texts = ctx.req.params.get("texts")
    if texts is None and ctx.req.params.get("text") is not None:
        texts = [ctx.req.params["text"]]
    if not texts or not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ProtocolError("invalid_request", "embed_text needs 'texts': a non-empty list of strings")
    return Outcome(_embeddings(encoder.embed_texts(texts, cancel=ctx.cancel)))


def op_classify(bridge: Bridge, ctx: Context) -> Outcome:
    encoder = bridge.runtime.require("medsiglip")
    p = ctx.req.params
    labels = p.get("labels")
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
        raise ProtocolError("invalid_request", "labels must be a list of strings")
    label_set = p.get("label_set")
    if label_set is not None and not isinstance(label_set, str):
        raise ProtocolError("invalid_request", "label_set must be a string")
    image = ctx.budget.load(media.one_image(p), allow_paths=ctx.allow_paths)
    out = classification(encoder.classify(image, labels=labels or None, label_set=label_set))
    best = max(range(len(out["scores"])), key=out["scores"].__getitem__)
    return Outcome({**out, "top": {"label": out["labels"][best], "score": out["scores"][best]}})


def op_search_similar(bridge: Bridge, ctx: Context) -> Outcome:
    p = ctx.req.params
    k = 5 if p.get("k") is None else p["k"]  # its type and range: android_bridge.params
    index = bridge.runtime.require_index()
    encoder = bridge.runtime.require("medsiglip")
    side = p.get("thumbnails")
    lo, hi = THUMBNAIL_SIDES
    if side is not None and (isinstance(side, bool) or not isinstance(side, int) or not lo <= side <= hi):
        raise ProtocolError("invalid_request", f"thumbnails must be a size in pixels from {lo} to {hi}")
    if isinstance(p.get("text"), str):
        hits = index.search_text(p["text"], encoder=encoder, k=k)
    else:
        image = ctx.budget.load(media.one_image(p), allow_paths=ctx.allow_paths)
        hits = index.search_image(image, encoder=encoder, k=k)
    matches = [_entry(e) for e in hits]
    if side:
        for m, e in zip(matches, hits, strict=True):
            m["thumbnail"] = bridge.thumbnails.get(m["content"], str(_field(e, "content_hash") or ""), side)
    return Outcome({"matches": matches})


def op_cancel(bridge: Bridge, ctx: Context) -> Outcome:
    target = ctx.req.params.get("target")
    if not isinstance(target, str) or target == ctx.id:
        raise ProtocolError("invalid_request", "cancel needs 'target': the id of another request")
    return Outcome({"target": target, "found": bridge.cancel(target, caller=ctx.caller)})


def op_shutdown(bridge: Bridge, ctx: Context) -> Outcome:
    bridge.shutting_down.set()  # refuse new work from now on, before this reply is sent

    def stop() -> None:  # after this request's done: cancel the rest, stop the transports
        bridge.cancel_all()
        for hook in bridge.shutdown_hooks:
            hook()

    ctx.after.append(stop)
    return Outcome({"shutting_down": True, "active_requests": bridge.active - 1})


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


HANDLERS = {
    "health": op_health,
    "load": op_load,
    "unload": op_unload,
    "generate": op_generate,
    "prepare_image": op_prepare_image,
    "embed_image": op_embed_image,
    "embed_text": op_embed_text,
    "classify": op_classify,
    "search_similar": op_search_similar,
    "cancel": op_cancel,
    "shutdown": op_shutdown,
}

# the clinic's ops (studies, reports) and the clinic server's admin ops live in their own
# modules, over this one's Outcome
from android_bridge import clinic_ops  # noqa: E402
from android_bridge.lan import ops as lan_ops  # noqa: E402

HANDLERS |= clinic_ops.HANDLERS | lan_ops.HANDLERS
