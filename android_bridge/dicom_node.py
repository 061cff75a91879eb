"""The DICOM node: a Storage SCP (pynetdicom) that puts what the clinic's modality pushes into the
study store (:class:`edge.studies.store.StudyStore`).

* **C-ECHO** (Verification) and **C-STORE** for the storage classes a clinic sends
  (:data:`STORAGE_CLASSES`: CR, DX / mammography / intra-oral for presentation and processing,
  CT and MR (+ enhanced), US (+ multi-frame), Secondary Capture (+ multi-frame), VL photographic
  and ophthalmic photography) in the usual transfer syntaxes (:data:`TRANSFER_SYNTAXES`:
  implicit / explicit VR, deflated, JPEG baseline / extended / lossless, JPEG-LS, JPEG 2000,
  HTJ2K, RLE). Compressed data is stored as received; whether this device can show it is the
  store's verdict (``displayable`` / ``why_not``).
* **Who may send**: ``allowed_aes`` (calling AE titles; empty = any) is checked by pynetdicom at
  association (A-ASSOCIATE-RJ "calling AE title not recognised"); ``allowed_peers`` (IP
  addresses or networks like ``192.168.1.0/24``; empty = any) is checked on the association
  request (rejected permanent, no reason given). Bound to 127.0.0.1 unless told otherwise; a
  non-loopback bind is logged as a LAN bind at start.
* **Statuses**: stored or duplicate → 0x0000; the disk full or an instance over the size limit →
  0xA700 (out of resources: the modality keeps it and retries); a data set that can't be parsed
  → 0xC210, one without the UIDs an instance needs → 0xC211; anything unexpected → 0x0110.
* **Threads**: pynetdicom runs each association in its own thread; the store is thread-safe.
  ``on_stored(Stored)`` runs in that thread after the catalogue row committed, only for new
  instances; keep it short (queue the work), its errors are logged and never change the status.

Logs carry the association number, calling AE title, peer address, UID hashes, sizes and
timings; never patient data or UIDs (pynetdicom's own logger is kept at WARNING for that).
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import threading
import time
from collections.abc import Callable

from edge.errors import InputError, ResourceError, TooLargeError, UsageError, require
from edge.studies.instance import InvalidInstance
from edge.studies.store import Stored, StudyStore, uid_hash

log = logging.getLogger(__name__)

# Storage SOP classes accepted (PS3.4 B.5), by pynetdicom's names.
STORAGE_CLASSES = (
    "ComputedRadiographyImageStorage",
    "DigitalXRayImageStorageForPresentation",
    "DigitalXRayImageStorageForProcessing",
    "DigitalMammographyXRayImageStorageForPresentation",
    "DigitalMammographyXRayImageStorageForProcessing",
    "DigitalIntraOralXRayImageStorageForPresentation",
    "DigitalIntraOralXRayImageStorageForProcessing",
    "CTImageStorage",
    "EnhancedCTImageStorage",
    "MRImageStorage",
    "EnhancedMRImageStorage",
    "UltrasoundImageStorage",
    "UltrasoundMultiFrameImageStorage",
    "SecondaryCaptureImageStorage",
    "MultiFrameSingleBitSecondaryCaptureImageStorage",
    "MultiFrameGrayscaleByteSecondaryCaptureImageStorage",
    "MultiFrameGrayscaleWordSecondaryCaptureImageStorage",
    "MultiFrameTrueColorSecondaryCaptureImageStorage",
    "VLPhotographicImageStorage",
    "OphthalmicPhotography8BitImageStorage",
)
# Transfer syntaxes accepted for each of them, by pydicom's names.
TRANSFER_SYNTAXES = (
    "ExplicitVRLittleEndian",
    "ImplicitVRLittleEndian",
    "DeflatedExplicitVRLittleEndian",
    "ExplicitVRBigEndian",
    "JPEGBaseline8Bit",
    "JPEGExtended12Bit",
    "JPEGLossless",
    "JPEGLosslessSV1",
    "JPEGLSLossless",
    "JPEGLSNearLossless",
    "JPEG2000Lossless",
    "JPEG2000",
    "HTJ2KLossless",
    "HTJ2KLosslessRPCL",
    "HTJ2K",
    "RLELossless",
)
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210
INVALID_INSTANCE = 0xC211
PROCESSING_FAILURE = 0x0110
MAX_PDU = 262_144  # what we ask senders to send per PDU: fewer, larger reads than the 16 KiB default
STOP_GRACE_S = 5.0  # how long stop() lets associations in flight finish before aborting them
STORE_FINISH_S = 10.0  # and how long, at most, it then waits for a store already writing to commit


def check_ae_title(title: str, what: str = "AE title") -> str:
    """An AE title as DICOM allows it (1-16 characters, no backslash or control characters),
    stripped; UsageError otherwise."""
    t = str(title).strip()
    if not 1 <= len(t) <= 16 or "\\" in t or not t.isascii() or not t.isprintable():
        raise UsageError(
            f"{what} {title!r} is not a DICOM AE title (1 to 16 printable ASCII characters, no \\)"
        )
    return t


def parse_peers(peers) -> tuple:
    """IP addresses / networks (``10.0.0.7``, ``192.168.1.0/24``, ``::1``) → ip_network objects."""
    out = []
    for p in peers:
        try:
            out.append(ipaddress.ip_network(str(p).strip(), strict=False))
        except ValueError:
            raise UsageError(
                f"--allow-peer {p!r} is not an IP address or network (e.g. 192.168.1.20, 10.0.0.0/24)"
            ) from None
    return tuple(out)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DicomNode:
    """A Storage SCP in front of ``store``. ``start()`` returns at once; ``stop()`` ends it."""

    def __init__(
        self,
        store: StudyStore,
        *,
        host: str = "127.0.0.1",
        port: int = 11112,
        ae_title: str = "MEDGEMMA",
        allowed_aes: tuple[str, ...] = (),
        allowed_peers: tuple[str, ...] = (),
        on_stored: Callable[[Stored], None] | None = None,
    ):
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise UsageError(f"DICOM port must be 0 to 65535 (0: a free one), got {port!r}")
        self.store = store
        self.host = host
        self.ae_title = check_ae_title(ae_title)
        self.allowed_aes = tuple(check_ae_title(a, "--allow-ae") for a in allowed_aes)
        self.allowed_peers = parse_peers(allowed_peers)
        self.on_stored = on_stored
        self._want_port = port
        self._server = None
        self._ae = None
        self._ids = itertools.count(1)
        self._inflight = 0
        self._idle = threading.Condition()
        self._stopped = threading.Event()
        self.stats = {"associations": 0, "rejected": 0, "stored": 0, "duplicates": 0, "failed": 0}
        self._stats_lock = threading.Lock()

    @property
    def port(self) -> int:
        """The bound port (the one the OS chose for port 0); the requested one before start()."""
        return self._server.server_address[1] if self._server is not None else self._want_port

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Bind and serve in background threads.

        Raises:
            UsageError: the address can't be bound (in use, not this machine's, a privileged port).
            MissingDependency: pynetdicom is not installed (the ``dicom`` extra).
        """
        pynetdicom = require("pynetdicom", "dicom")
        import pydicom.uid as pydicom_uid
        from pynetdicom import evt, sop_class

        if self._server is not None:
            return
        quiet = logging.getLogger("pynetdicom")
        if quiet.level == logging.NOTSET:  # at INFO it logs data set contents: never patient data in logs
            quiet.setLevel(logging.WARNING)
        ae = pynetdicom.AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = MAX_PDU
        ae.require_calling_aet = list(self.allowed_aes)
        syntaxes = [getattr(pydicom_uid, n) for n in TRANSFER_SYNTAXES]
        for name in STORAGE_CLASSES:
            ae.add_supported_context(getattr(sop_class, name), syntaxes)
        ae.add_supported_context(sop_class.Verification)
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        try:
            self._server = ae.start_server((self.host, self._want_port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise UsageError(
                f"can't listen for DICOM on {self.host}:{self._want_port} ({exc.strerror or exc}); "
                "choose another port (--dicom-port) or address"
            ) from None
        self._ae = ae
        self._stopped.clear()
        where = f"{self.host}:{self.port}"
        allowed = f"AEs {', '.join(self.allowed_aes)}" if self.allowed_aes else "any calling AE"
        peers = f"peers {', '.join(map(str, self.allowed_peers))}" if self.allowed_peers else "any peer"
        if is_loopback(self.host):
            log.info(
                "dicom: node %s listening on %s (this device only; %s, %s)",
                self.ae_title,
                where,
                allowed,
                peers,
            )
        else:
            log.warning(
                "dicom: node %s listening on %s: a LAN bind, reachable from the network (%s, %s)",
                self.ae_title,
                where,
                allowed,
                peers,
            )

    def stop(self, *, grace_s: float = STOP_GRACE_S) -> None:
        """Stop accepting, let associations in flight finish (up to ``grace_s``), abort the rest,
        and wait for stores in progress to commit. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            self._stopped.set()
            return
        server.shutdown()  # no new associations
        deadline = time.monotonic() + grace_s
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.02)
        for assoc in server.active_associations:
            assoc.abort()
        with self._idle:  # a store already writing finishes its commit (an abort can't cut it short)
            self._idle.wait_for(
                lambda: self._inflight == 0, timeout=max(STORE_FINISH_S, deadline - time.monotonic())
            )
        log.info(
            "dicom: node stopped (%d associations, %d stored, %d duplicates, %d failed, %d rejected)",
            self.stats["associations"],
            self.stats["stored"],
            self.stats["duplicates"],
            self.stats["failed"],
            self.stats["rejected"],
        )
        self._stopped.set()

    def serve_forever(self) -> None:
        """start() if needed, then block until stop() (from a signal handler or another thread)."""
        self.start()
        while not self._stopped.wait(0.5):
            pass

    # -- handlers (each in its association's thread) ----------------------------------------------

    def _count(self, what: str) -> None:
        with self._stats_lock:
            self.stats[what] += 1

    @staticmethod
    def _tag(assoc) -> str:
        return f"#{getattr(assoc, '_medgemma_id', '?')}"

    def _on_requested(self, event) -> None:
        assoc = event.assoc
        assoc._medgemma_id = next(self._ids)
        if not self.allowed_peers:
            return
        addr = str(assoc.requestor.address).split("%")[0]
        try:
            ip = ipaddress.ip_address(addr)
            ip = ip.ipv4_mapped or ip if ip.version == 6 else ip
            ok = any(ip in net for net in self.allowed_peers)
        except ValueError:
            ok = False
        if not ok:
            self._count("rejected")
            log.warning(
                "dicom: association %s from %s refused: peer not on the allow-list", self._tag(assoc), addr
            )
            assoc.acse.send_reject(0x01, 0x01, 0x01)  # rejected permanent, service user, no reason given
            assoc.kill()

    def _on_accepted(self, event) -> None:
        a = event.assoc
        self._count("associations")
        log.info(
            "dicom: association %s accepted from AE %r at %s",
            self._tag(a),
            a.requestor.ae_title,
            a.requestor.address,
        )

    def _on_rejected(self, event) -> None:
        a = event.assoc
        if not self.allowed_aes or a.requestor.ae_title in self.allowed_aes:
            return  # the peer check above logged it
        self._count("rejected")
        log.warning(
            "dicom: association %s from %s refused: calling AE %r is not on the allow-list",
            self._tag(a),
            a.requestor.address,
            a.requestor.ae_title,
        )

    def _on_echo(self, event) -> int:
        log.info("dicom: association %s: C-ECHO", self._tag(event.assoc))
        return 0x0000

    def _on_store(self, event):
        with self._idle:
            self._inflight += 1
        try:
            return self._store(event)
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def _store(self, event):
        t0 = time.perf_counter()
        tag = self._tag(event.assoc)
        sop = uid_hash(str(getattr(event.request, "AffectedSOPInstanceUID", "") or ""))
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as exc:
            return self._fail(tag, sop, CANNOT_UNDERSTAND, "can't read the data set", exc)
        try:
            got = self.store.add_bytes(data, calling_ae=event.assoc.requestor.ae_title, source="dicom")
        except ResourceError as exc:  # a full disk: the sender keeps the instance and retries
            return self._fail(tag, sop, OUT_OF_RESOURCES, "out of resources on the receiving device", exc)
        except TooLargeError as exc:
            return self._fail(tag, sop, OUT_OF_RESOURCES, "instance over the receiver's size limit", exc)
        except InvalidInstance as exc:
            return self._fail(
                tag, sop, INVALID_INSTANCE, "not a storable instance (required UIDs missing)", exc
            )
        except InputError as exc:
            return self._fail(tag, sop, CANNOT_UNDERSTAND, "can't parse the data set", exc)
        except Exception as exc:  # a bug: the sender is told "processing failure", the log has the type
            log.exception("dicom: association %s: storing sop=%s failed", tag, sop)
            return self._fail(tag, sop, PROCESSING_FAILURE, "processing failure on the receiver", exc)
        self._count("stored" if got.status == "stored" else "duplicates")
        log.info(
            "dicom: association %s: %s sop=%s study=%s %d bytes in %.0f ms",
            tag,
            got.status,
            uid_hash(got.sop_instance_uid),
            uid_hash(got.study_uid),
            got.bytes,
            (time.perf_counter() - t0) * 1e3,
        )
        if got.status == "stored" and self.on_stored is not None:
            try:
                self.on_stored(got)
            except Exception:
                log.exception("dicom: on_stored callback failed for sop=%s", uid_hash(got.sop_instance_uid))
        return 0x0000

    def _fail(self, tag: str, sop: str, code: int, comment: str, exc: BaseException):
        from pydicom.dataset import Dataset

        self._count("failed")
        log.warning(
            "dicom: association %s: sop=%s refused with 0x%04X (%s: %s)",
            tag,
            sop,
            code,
            type(exc).__name__,
            comment,
        )
        status = Dataset()
        status.Status = code
        status.ErrorComment = comment[:64]
        return status
