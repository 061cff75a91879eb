"""The clinic side of a running bridge: its stores, the DICOM node and the ingest rules.

:func:`attach` opens the study and report stores under the data directory, starts the DICOM
node (when a port is configured), the report outbox's deliverer (when a destination is), and
the two optional rules for received images: ``index_received`` adds each one to the
similar-case index (modality and body part as metadata) and ``prepare_received`` encodes the
newest study for MedGemma while the device is idle (it yields at once to a client's request).
Each is stopped by the bridge's shutdown hooks. Nothing here logs patient content: UIDs are
logged as hashes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from android_bridge.bridge import Bridge
    from android_bridge.settings import ServeSettings

log = logging.getLogger(__name__)

IDLE_S = 2.0  # how long the bridge must have been idle before prepare_received starts encoding


def open_stores(settings: ServeSettings) -> tuple[Any, Any]:
    """The study and report stores under ``settings.data_dir`` (None, None without one)."""
    if settings.data_dir is None:
        return None, None
    from edge.reports.store import ReportStore
    from edge.studies.store import StudyStore

    root = settings.data_dir
    return StudyStore(root / "studies"), ReportStore(root / "reports")


def attach(bridge: Bridge, settings: ServeSettings) -> None:
    """Start what ``settings`` asks for around ``bridge`` (its runtime holds the stores)."""
    rt = bridge.runtime
    # closers run in reverse: the DICOM node stops first, then the outbox, then the ingest worker
    workers = []
    if rt.studies is not None and (settings.index_received or settings.prepare_received):
        worker = ReceivedWorker(bridge, index=settings.index_received, prepare=settings.prepare_received)
        worker.start()
        workers.append(worker)
        bridge.closers.append(worker.stop)
    if rt.studies is not None and settings.dicom is not None and settings.dicom.port is not None:
        from android_bridge.dicom_node import DicomNode

        d = settings.dicom
        on_stored = workers[0].received if workers else None
        node = DicomNode(
            rt.studies,
            host=d.host,
            port=d.port,
            ae_title=d.ae_title,
            allowed_aes=tuple(d.allowed_aes),
            allowed_peers=tuple(d.allowed_peers),
            on_stored=on_stored,
        )
        node.start()
        bridge.dicom = {"ae_title": d.ae_title, "host": d.host, "port": node.port}
        bridge.dicom_node = node
        bridge.closers.append(node.stop)
        log.info("dicom: node %s listening on %s:%d", d.ae_title, d.host, node.port)
    if rt.reports is not None:
        # always: send_report may name its destination even when serve configured none
        from android_bridge.delivery import DeliverySettings, make_senders
        from edge.reports.outbox import Deliverer, Outbox

        delivery = rt.delivery or DeliverySettings()
        bridge.deliverer = Deliverer(
            Outbox(rt.reports), make_senders(rt.reports, rt.studies, delivery), interval_s=delivery.interval_s
        )
        bridge.deliverer.start()
        bridge.closers.append(bridge.deliverer.stop)


class ReceivedWorker:
    """One background thread for the ingest rules, fed by the DICOM node's ``on_stored``.

    The node's association threads only enqueue (they answer the modality at once); this thread
    indexes each received instance and, once the bridge has been idle for :data:`IDLE_S`,
    prepares the newest one for MedGemma, cancelled as soon as a request arrives.
    """

    def __init__(self, bridge: Bridge, *, index: bool, prepare: bool):
        self.bridge = bridge
        self.index = index
        self.prepare = prepare
        self.queue: queue.Queue = queue.Queue(maxsize=10_000)
        self.stopping = threading.Event()
        self.cancel = threading.Event()
        self.pending_prepare: tuple[str, str] | None = None
        self.thread = threading.Thread(target=self._run, name="received", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.cancel.set()
        self.queue.put(None)
        self.thread.join(timeout=10)

    def received(self, stored: Any) -> None:
        """The DICOM node's callback: queue the stored instance (never blocks the node)."""
        if getattr(stored, "status", "stored") != "stored" or not getattr(stored, "displayable", True):
            return
        try:
            self.queue.put_nowait(stored)
        except queue.Full:
            log.warning("received: ingest queue full; an instance was not indexed or prepared")

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                stored = self.queue.get(timeout=0.5)
            except queue.Empty:
                stored = ...
            if stored is None:
                break
            if stored is not ...:
                if self.index:
                    self._index(stored)
                if self.prepare:
                    self.pending_prepare = (stored.study_uid, stored.sop_instance_uid)
            if self.pending_prepare is not None and self._idle():
                self._prepare(*self.pending_prepare)

    def _idle(self) -> bool:
        b = self.bridge
        return b.active == 0 and time.monotonic() - getattr(b, "last_request_at", 0.0) >= IDLE_S

    def _index(self, stored: Any) -> None:
        from edge.studies.store import uid_hash

        rt = self.bridge.runtime
        try:
            encoder = rt.require("medsiglip")
            if rt.index is None and rt.index_dir is not None and not rt.index_dir.exists():
                from edge.cases.index import CaseIndex

                rt.index = CaseIndex.open(rt.index_dir, encoder=encoder, create=True)  # the first case
            index = rt.require_index()
            info = rt.studies.instance_info(stored.study_uid, stored.sop_instance_uid)
            study = rt.studies.get_study(stored.study_uid)
            meta = {"source": "dicom", "study": uid_hash(stored.study_uid)}
            series = next(
                (s for s in study["series"] if s["series_uid"] == stored.series_uid),
                {},
            )
            for key in ("modality", "body_part"):
                if series.get(key):
                    meta[key] = str(series[key])
            path = rt.studies.instance_path(stored.study_uid, stored.sop_instance_uid)
            t0 = time.perf_counter()
            rep = index.add([path], encoder=encoder, meta=meta)
            log.info(
                "received: instance %s indexed (%s bytes, %d added) in %.2fs",
                uid_hash(stored.sop_instance_uid),
                info.get("bytes"),
                getattr(rep, "added", 0),
                time.perf_counter() - t0,
            )
        except Exception as exc:  # the index or MedSigLIP missing: the instance is kept, just not indexed
            log.warning("received: not indexed (%s: %s)", type(exc).__name__, exc)

    def _prepare(self, study_uid: str, instance_uid: str) -> None:
        from android_bridge import media
        from edge.studies.store import uid_hash

        self.pending_prepare = None
        rt = self.bridge.runtime
        model = rt.slots["medgemma"].model
        if model is None or not hasattr(model, "prepare_image"):
            return
        self.cancel.clear()
        self.bridge.idle_cancels.add(self.cancel)
        try:
            image = media.load({"study": study_uid, "instance": instance_uid}, studies=rt.studies)
            got = model.prepare_image(image, cancel=self.cancel, wait=False, prefill=True)
            log.info(
                "received: instance %s prepared for MedGemma in %.2fs (cached: %s)",
                uid_hash(instance_uid),
                got.get("encode_s", 0.0),
                got.get("cached"),
            )
        except Exception as exc:  # busy, cancelled by a request, or not displayable: try again later
            log.info("received: prepare skipped (%s)", type(exc).__name__)
        finally:
            self.bridge.idle_cancels.discard(self.cancel)
