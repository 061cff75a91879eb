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

Callers (clinic-server mode, android_bridge.lan): a request runs for a caller, :data:`ADMIN`
(the launch token, the in-process and line transports) or a paired device's id. The HTTP guard
sets :data:`CALLER` in the request's context and :meth:`Bridge.submit` runs the request in
that context on its worker. Request ids are per caller (two tablets may both send id "1";
``cancel`` reaches the caller's own requests only); a device may not run :data:`ADMIN_OPS`
(``forbidden``) nor name image files on the server. In LAN mode (``bridge.lan``) a generation
that finds MedGemma busy waits its turn in a fair FIFO queue with ``queued`` events
(android_bridge.lan.queue) instead of getting ``busy``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from android_bridge import clinic, media, ops, params
from android_bridge.pictures import Thumbnails
from android_bridge.protocol import (
    ProtocolError,
    Request,
    done,
    dumps,
    error,
    error_from_exception,
    event,
    parse_request,
    request_id,
    result,
)
from android_bridge.runtime import RETRY_AFTER_S, Runtime
from android_bridge.settings import Limits
from edge.errors import EdgeError

MEDGEMMA_OPS = ("generate", "prepare_image")  # the ops that take MedGemma from idle background work
ADMIN = "admin"  # the caller holding the launch token (and every in-process or line transport)
ADMIN_OPS = ("shutdown", "load", "unload", "lan_pair_code", "lan_devices", "lan_revoke")  # not for devices
# who the request in this context runs for (set by the HTTP guard), and the audit note of its
# HTTP request (android_bridge.lan.http.Audit; None outside LAN mode): the bridge fills in op and finish
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("bridge_caller", default=ADMIN)
AUDIT: contextvars.ContextVar[dict | None] = contextvars.ContextVar("bridge_audit", default=None)

log = logging.getLogger(__name__)
Emit = Callable[[dict], None]


class Deadline(threading.Event):
    """A request's cancel flag that also turns itself on at a wall-clock deadline.

    Everything that stops on a cancel (a generation within one token, image encoding, the
    embedding loops) checks ``is_set()``, so the per-request time limit needs no timer thread.
    """

    def __init__(self, timeout_s: float = 0.0):
        super().__init__()
        self.deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
        self.timeout_s = timeout_s
        self.timed_out = False

    def pause(self) -> None:
        """Stop the clock (a LAN-mode generation waiting in line): only a cancel sets it now."""
        self.deadline = None

    def restart(self) -> None:
        """Give the whole time limit again from now (its turn has come)."""
        if self.timeout_s > 0:
            self.deadline = time.monotonic() + self.timeout_s

    def is_set(self) -> bool:
        if super().is_set():
            return True
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.timed_out = True
            self.set()
            return True
        return False


@dataclass
class Context:
    """One running request: its id and params, its emitter, its cancel flag and image budget."""

    req: Request
    emit: Emit
    cancel: threading.Event
    after: list[Callable[[], None]] = field(default_factory=list)
    budget: media.ImageBudget = field(default_factory=media.ImageBudget)
    caller: str = ADMIN
    allow_paths: bool = True  # the bridge's allow_paths, and False for a paired device

    @property
    def id(self) -> str:
        return self.req.id

    def event(self, kind: str, **fields: Any) -> None:
        self.emit(event(self.id, kind, **fields))


class Bridge:
    """Requests in, replies out, over a :class:`Runtime`."""

    def __init__(
        self, runtime: Runtime, *, allow_paths: bool = True, workers: int = 8, limits: Limits | None = None
    ):
        self.runtime = runtime
        self.dicom: dict | None = None  # set by serve when its DICOM node listens: {ae_title, host, port}
        self.dicom_node: Any = None  # android_bridge.dicom_node.DicomNode, when one listens
        self.deliverer: Any = None  # edge.reports.outbox.Deliverer, when a destination is configured
        # background work on MedGemma while the device is idle (android_bridge.clinic): each event is
        # set, and the work waited for, as soon as a request needs the model
        self.idle_cancels: set[threading.Event] = set()
        self.last_request_at = 0.0  # monotonic time of the last request that needed MedGemma
        self.allow_paths = allow_paths
        self.limits = limits or Limits()
        self.lan: Any = None  # android_bridge.lan.mode.LanMode in clinic-server mode (serve --lan)
        self._extra_inflight = 0  # room for queued generations in LAN mode (grow())
        self._inflight = 0  # submitted and not finished (queued for a worker or running)
        self.transports: list[str] = ["in-process"]
        self.shutdown_hooks: list[Callable[[], None]] = []  # stop the transports (the shutdown op)
        self.closers: list[Callable[[], None]] = []  # stop the DICOM node, the outbox ... (shutdown())
        self.shutting_down = threading.Event()
        self._active: dict[tuple[str, str], threading.Event] = {}  # (caller, request id) -> cancel
        self._lock = threading.Lock()
        self.thumbnails = Thumbnails()
        # Transports run requests on these long-lived threads rather than a thread per request:
        # with a fresh thread each time, glibc handed out new malloc arenas and RSS crept up.
        self._workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bridge")

    def grow(self, waiting: int) -> None:
        """Make room for ``waiting`` generations waiting their turn (LAN mode's queue): as many
        more worker threads and requests in flight. Call before serving."""
        self._extra_inflight = waiting
        old = self._pool
        self._workers += waiting
        self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="bridge")
        old.shutdown(wait=False)

    def submit(self, raw: Any, emit: Emit, then: Callable[[], None] | None = None) -> Future:
        """Run ``handle(raw, emit)`` on the bridge's worker threads; ``then()`` runs after it.

        At most ``limits.max_active_requests`` are in flight (queued or running; in LAN mode
        plus the queue's bound): past that a request is answered ``busy`` at once, on the
        caller's thread, and nothing is queued, except ``health`` and ``cancel``, which are
        answered inline (they take no time) so that a client can always see the state and stop
        what runs. The request runs in the caller's context (:data:`CALLER`, :data:`AUDIT`).
        """
        with self._lock:
            full = self._inflight >= self.limits.max_active_requests + self._extra_inflight
            if not full:
                self._inflight += 1
        if full:
            return self._refuse(raw, emit, then)
        context = contextvars.copy_context()

        def run() -> None:
            try:
                context.run(self.handle, raw, emit)
            finally:
                with self._lock:
                    self._inflight -= 1
                if then is not None:
                    then()

        try:
            return self._pool.submit(run)
        except RuntimeError:  # the pool is shut down: the runtime is stopping
            with self._lock:
                self._inflight -= 1
            return self._refuse(raw, emit, then, why="the runtime is shutting down")

    def _refuse(self, raw: Any, emit: Emit, then: Callable[[], None] | None, *, why: str = "") -> Future:
        future: Future = Future()
        try:
            op = _op_of(raw)
            if op in ("health", "cancel") and not why:
                self.handle(raw, emit)
            else:
                rid = request_id(raw)
                safe = _SafeEmit(emit)
                if why:
                    safe(error(rid, "not_loaded", why))
                else:
                    n = self.limits.max_active_requests
                    safe(
                        error(
                            rid,
                            "busy",
                            f"{n} requests are in flight already (the limit)",
                            retry_after=RETRY_AFTER_S,
                        )
                    )
                safe(done(rid, "error"))
                log.info("bridge: refused %s (%s)", rid, why or "too many requests in flight")
        finally:
            if then is not None:
                then()
            future.set_result(None)
        return future

    # -- the core ----------------------------------------------------------------------------

    def handle(self, raw: Any, emit: Emit) -> str:
        """Run one request (bytes, str or dict); replies go to ``emit``. Returns the finish reason.

        Never raises: whatever happens, ``emit`` gets exactly one ``done``, last. A failure the
        request caused is a typed error; ``internal`` means a bug, logged with the request id.
        """
        safe = _SafeEmit(emit)
        try:
            return self._handle(raw, safe)
        except Exception:  # a bug in the bridge itself: still end the stream
            rid = request_id(raw)
            log.exception("bridge: %s failed outside its op", rid)
            if not safe.done_sent:
                safe(error(rid, "internal", "internal error; see the runtime's log"))
                safe(done(rid, "error"))
            return "error"

    def _handle(self, raw: Any, safe: _SafeEmit) -> str:
        t0 = time.perf_counter()
        caller, note = CALLER.get(), AUDIT.get()
        req = None
        try:
            req = parse_request(raw)
            if note is not None:
                note["op"] = req.op
            params.check(req.op, req.params)
            if caller != ADMIN and req.op in ADMIN_OPS:
                raise ProtocolError(
                    "forbidden", f"{req.op} is for the server's admin (the launch token), not a device"
                )
        except ProtocolError as exc:
            rid = req.id if req is not None else exc.request_id
            safe(error(rid, exc.code, str(exc), retry_after=exc.retry_after))
            safe(done(rid, "error"))
            log.info("bridge: rejected request %s (%s)", rid, exc.code)
            if note is not None:
                note["finish"] = "error"
            return "error"
        cancel = Deadline(self.limits.request_timeout_s)
        safe.on_failure = cancel.set  # a client that went away cancels its request
        key = (caller, req.id)
        with self._lock:
            duplicate = key in self._active
            if not duplicate:
                self._active[key] = cancel
        if duplicate:
            safe(error(req.id, "invalid_request", f"request id {req.id!r} is already running"))
            safe(done(req.id, "error"))
            if note is not None:
                note["finish"] = "error"
            return "error"
        ctx = Context(
            req,
            safe,
            cancel,
            budget=(media.ImageBudget if caller == ADMIN else _DeviceBudget)(
                self.limits.max_images, self.limits.max_request_pixels, studies=self.runtime.studies
            ),
            caller=caller,
            allow_paths=self.allow_paths and caller == ADMIN,
        )
        outcome, failure = None, None
        try:
            if self.shutting_down.is_set() and req.op not in ("health", "cancel"):
                raise ProtocolError("not_loaded", "the runtime is shutting down")
            if req.op in MEDGEMMA_OPS:
                self._yield_idle_work()
            outcome = ops.HANDLERS[req.op](self, ctx)
        except Exception as exc:
            failure = exc
            if not isinstance(exc, EdgeError):
                log.exception("bridge: %s %s failed", req.id, req.op)
        finally:
            with self._lock:
                cancelled = cancel.is_set()
                del self._active[key]
        total = {"total_s": time.perf_counter() - t0}
        if cancelled:
            finish = "cancelled"
            if cancel.timed_out:
                limit = self.limits.request_timeout_s
                safe(error(req.id, "cancelled", f"the request ran past the runtime's {limit:g} s limit"))
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
        if note is not None:
            note["finish"] = finish
        log.info(
            "bridge: %s%s %s -> %s%s in %.3fs",
            "" if caller == ADMIN else f"{caller}/",
            req.id,
            req.op,
            finish,
            f" ({code})" if code else (" (timed out)" if cancel.timed_out else ""),
            total["total_s"],
        )
        for hook in ctx.after:
            hook()
        return finish

    def _yield_idle_work(self) -> None:
        """Cancel background work on MedGemma (android_bridge.clinic) and wait for it to let go."""
        self.last_request_at = time.monotonic()
        if not self.idle_cancels:
            return
        for ev in list(self.idle_cancels):
            ev.set()
        deadline = time.monotonic() + 30.0
        while self.idle_cancels and time.monotonic() < deadline:
            time.sleep(0.01)

    def cancel(self, target: str, *, caller: str | None = None) -> bool:
        """Cancel a running request of ``caller`` (default: :data:`CALLER`'s) by id. True when
        it was running (it will end cancelled)."""
        with self._lock:
            ev = self._active.get((caller or CALLER.get(), target))
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
        for close in reversed(self.closers):
            try:
                close()
            except Exception:  # one failing closer must not keep the others from running
                log.exception("bridge: a closer failed at shutdown")
        self.closers.clear()
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


class _DeviceBudget(media.ImageBudget):
    """A paired device's image budget: never a file path, which would name a file on the server."""

    def load(self, src: Any, *, allow_paths: bool = True) -> media.LoadedImage:
        return super().load(src, allow_paths=False)


def _op_of(raw: Any) -> Any:
    """The op a raw request names (None when it can't be read)."""
    try:
        return (raw if isinstance(raw, dict) else json.loads(raw)).get("op")
    except Exception:
        return None


class _SafeEmit:
    """An emitter that never raises into the op: a failed write marks the client gone."""

    def __init__(self, emit: Emit):
        self.emit = emit
        self.on_failure: Callable[[], None] | None = None
        self.failed = False
        self.done_sent = False

    def __call__(self, msg: dict) -> None:
        if msg.get("type") == "done":
            self.done_sent = True
        if self.failed:
            return
        if msg.get("type") == "result":
            try:  # a result that can't be JSON (a NaN score from a broken model) is a bug, not a hang-up
                dumps(msg)
            except (TypeError, ValueError):
                log.exception("bridge: %s: the result is not valid JSON", msg.get("id"))
                msg = error(
                    msg.get("id"), "internal", "the result could not be encoded; see the runtime's log"
                )
        try:
            self.emit(msg)
        except Exception as exc:
            self.failed = True
            log.info("bridge: client went away (%s); cancelling %s", type(exc).__name__, msg.get("id"))
            if self.on_failure:
                self.on_failure()


def call(bridge: Bridge, request: Any) -> list[dict]:
    """The in-process transport: run ``request`` and return its replies, ``done`` last."""
    out: list[dict] = []
    bridge.handle(request, out.append)
    return out


def bridge_for(settings) -> Bridge:
    """A bridge over ``settings``' bundle(s) (android_bridge.settings.ServeSettings), with its
    models preloading in the background (``health`` shows them loading)."""
    studies, reports = clinic.open_stores(settings)
    runtime = Runtime(
        settings.bundle,
        studies=studies,
        reports=reports,
        delivery=settings.delivery,
        medsiglip_bundle=settings.medsiglip_bundle,
        index_dir=settings.index,
        medgemma_settings=settings.medgemma,
        medsiglip_settings=settings.medsiglip,
        image_cache=settings.image_cache,
    )
    bridge = Bridge(runtime, allow_paths=settings.allow_paths, limits=settings.limits)
    for store in (studies, reports):  # closed last, after everything that writes to them stopped
        if store is not None:
            bridge.closers.append(store.close)
    clinic.attach(bridge, settings)
    bridge.preload([n for n in settings.preload if runtime.available(n)])
    return bridge
