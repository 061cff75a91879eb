"""The network side of report delivery: a PACS (DICOM C-STORE SCU, pynetdicom) and a FHIR
endpoint (HTTP POST, urllib), behind the persistent outbox of :mod:`edge.reports.outbox`.

``serve`` builds a :class:`DeliverySettings` from its flags, then::

    outbox = Outbox(report_store)
    deliverer = Deliverer(outbox, make_senders(report_store, studies, settings), settings.interval_s)
    deliverer.start()   # ... deliverer.stop() at shutdown, before the stores close

Each sender raises :class:`~edge.reports.outbox.DeliveryFailed` with a one-line reason on
failure (``permanent`` when the destination refused the document itself, so retrying can't
help); the outbox records it and retries with back-off. Nothing here logs report content or
patient data: item ids, UID hashes, byte counts and timings only.
"""

from __future__ import annotations

import io
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge.errors import UsageError, require
from edge.reports.outbox import DeliveryFailed, check_destination
from edge.reports.store import ReportStore, uid_hash
from edge.settings import check, setting

log = logging.getLogger(__name__)

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
MAX_REPLY_BYTES = 64 << 10  # of a FHIR server's answer, read for the error message


@dataclass(frozen=True)
class DeliverySettings:
    """Where signed reports go and how: each field is a ``serve`` flag (its ``flag``)."""

    pacs: str | None = setting(
        None,
        "PACS for send_report: HOST:PORT[/AE_TITLE] (C-STORE of the DICOM SR)",
        flag="--pacs",
        max_length=300,
    )
    fhir_url: str | None = setting(
        None,
        "FHIR endpoint for send_report: an http(s) URL the Bundle is POSTed to",
        flag="--fhir-url",
        max_length=2048,
    )
    default: str = setting(
        "dicom",
        "the destination send_report uses when none is given",
        flag="--send-default",
        choices=("dicom", "fhir"),
    )
    calling_ae_title: str = setting(
        "MEDGEMMA", "this device's AE title when it sends to the PACS", flag="--send-ae-title", max_length=16
    )
    organization: str = setting(
        "—",
        "the verifying organization written into the SR (the clinic)",
        flag="--organization",
        max_length=64,
    )
    institution: str | None = setting(
        None, "institution name for the SR and the PDF header", flag="--institution", max_length=64
    )
    fhir_bundle: str = setting(
        "collection", "FHIR Bundle type sent: collection (a document) or transaction (conditional creates)",
        flag="--fhir-bundle", choices=("collection", "transaction"),
    )  # fmt: skip
    interval_s: float = setting(
        30.0, "seconds between outbox rounds", flag="--outbox-interval", minimum=1.0, maximum=3600.0
    )
    timeout_s: float = setting(
        30.0,
        "network timeout of one delivery attempt, seconds",
        flag="--send-timeout",
        minimum=1.0,
        maximum=600.0,
    )

    def __post_init__(self) -> None:
        check(self)
        if self.pacs is not None:
            parse_pacs(self.pacs)
        if self.fhir_url is not None:
            check_destination({"kind": "fhir", "url": self.fhir_url})

    def destination(self, kind: str | None = None) -> dict:
        """The configured destination of ``kind`` (default: :attr:`default`), or a UsageError
        saying which flag configures it."""
        kind = kind or self.default
        if kind == "dicom":
            if self.pacs is None:
                raise UsageError(
                    "no PACS configured: start serve with --pacs HOST:PORT[/AE], or give a destination"
                )
            return parse_pacs(self.pacs)
        if kind == "fhir":
            if self.fhir_url is None:
                raise UsageError(
                    "no FHIR endpoint configured: start serve with --fhir-url URL, or give a destination"
                )
            return {"kind": "fhir", "url": self.fhir_url}
        raise UsageError(f"destination kind must be dicom or fhir, not {str(kind)[:20]!r}")


def parse_pacs(text: str) -> dict:
    """``HOST:PORT[/AE_TITLE]`` (``[v6]:PORT`` for IPv6) as a dicom destination; AE default ANY-SCP."""
    where, _, ae = str(text).partition("/")
    host, sep, port = where.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit():
        raise UsageError(
            f"PACS {str(text)[:80]!r} must be HOST:PORT or HOST:PORT/AE_TITLE, e.g. 10.0.0.5:104/PACS"
        )
    return check_destination({"kind": "dicom", "host": host, "port": int(port), "ae_title": ae or "ANY-SCP"})


# --- senders ------------------------------------------------------------------------------------

_REFUSED = {0x0122: "SOP class not supported", 0x0124: "not authorized"}


def dicom_sender(
    item: dict, sr_bytes: bytes, *, calling_ae: str = "MEDGEMMA", timeout_s: float = 30.0
) -> None:
    """C-STORE ``sr_bytes`` (a Comprehensive SR file) to the item's PACS, explicit VR little endian.

    Success and the warning statuses (0xB000, 0xB006, 0xB007: stored, with coercion) return;
    anything else raises DeliveryFailed: no association (unreachable, rejected, aborted), no
    response, out of resources (0xA7xx, retried), or a refusal of the document (0xA9xx, 0xCxxx,
    0x0122, 0x0124: permanent).
    """
    require("pynetdicom", "reports")
    pydicom = require("pydicom", "reports")
    from pynetdicom import AE

    dest = item["destination"]
    target = f"{dest['ae_title']}@{dest['host']}:{dest['port']}"
    ds = pydicom.dcmread(io.BytesIO(sr_bytes))
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(COMPREHENSIVE_SR, EXPLICIT_VR_LE)
    ae.connection_timeout = min(timeout_s, 10.0)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    t0 = time.monotonic()
    assoc = ae.associate(dest["host"], dest["port"], ae_title=dest["ae_title"])
    if not assoc.is_established:
        if assoc.is_rejected:
            raise DeliveryFailed(
                f"PACS {target} rejected the association (check its AE titles: we call as {calling_ae})"
            )
        raise DeliveryFailed(f"PACS {target} is unreachable (no association)")
    try:
        if not assoc.accepted_contexts:
            raise DeliveryFailed(f"PACS {target} does not accept Comprehensive SR storage", permanent=True)
        status = assoc.send_c_store(ds)
    finally:
        if assoc.is_established:
            assoc.release()
    if not status or "Status" not in status:
        raise DeliveryFailed(f"PACS {target} gave no C-STORE response (connection lost or timed out)")
    code = int(status.Status)
    if code == 0x0000 or code in (0xB000, 0xB006, 0xB007):
        log.info(
            "item %d: SR %s stored at %s (%d bytes, status 0x%04X, %.0f ms)", item["item_id"],
            uid_hash(ds.SOPInstanceUID), dest["kind"], len(sr_bytes), code, (time.monotonic() - t0) * 1000,
        )  # fmt: skip
        return
    comment = str(status.get("ErrorComment", "") or "").strip()[:120]
    why = _REFUSED.get(code, "out of resources" if code >> 8 == 0xA7 else "refused the SR")
    raise DeliveryFailed(
        f"PACS {target} answered C-STORE with status 0x{code:04X} ({why}{': ' + comment if comment else ''})",
        permanent=code >> 8 != 0xA7,
    )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise DeliveryFailed(
            f"FHIR endpoint redirected ({code}) to {newurl[:200]}: configure that URL instead", permanent=True
        )


def fhir_sender(item: dict, json_bytes: bytes, *, timeout_s: float = 30.0) -> None:
    """POST ``json_bytes`` (a FHIR Bundle) to the item's URL as ``application/fhir+json``.

    Only http(s) URLs; no proxy (a LAN endpoint, whatever the environment says) and no redirects.
    2xx returns; a connection failure, a timeout or a 5xx / 408 / 429 raises DeliveryFailed (retried);
    any other status raises it as permanent (the server refused the bundle).
    """
    url = check_destination({"kind": "fhir", "url": item["destination"].get("url")})["url"]
    request = urllib.request.Request(
        url,
        data=json_bytes,
        method="POST",
        headers={"Content-Type": "application/fhir+json; charset=utf-8", "Accept": "application/fhir+json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
    t0 = time.monotonic()
    try:
        with opener.open(request, timeout=timeout_s) as reply:
            code = reply.status
    except urllib.error.HTTPError as exc:
        detail = " ".join(exc.read(MAX_REPLY_BYTES).decode("utf-8", "replace").split())[:120]
        transient = exc.code >= 500 or exc.code in (408, 429)
        raise DeliveryFailed(
            f"FHIR endpoint answered HTTP {exc.code} {exc.reason}{': ' + detail if detail else ''}",
            permanent=not transient,
        ) from None
    except urllib.error.URLError as exc:
        raise DeliveryFailed(f"FHIR endpoint {url[:200]} is unreachable ({exc.reason})") from None
    except (TimeoutError, OSError) as exc:
        raise DeliveryFailed(f"FHIR endpoint {url[:200]} is unreachable ({exc})") from None
    if not 200 <= code < 300:
        raise DeliveryFailed(f"FHIR endpoint answered HTTP {code}", permanent=code < 500)
    log.info("item %d: FHIR bundle posted (%d bytes, HTTP %d, %.0f ms)", item["item_id"], len(json_bytes), code,
             (time.monotonic() - t0) * 1000)  # fmt: skip


def make_senders(
    store: ReportStore, studies: Any = None, settings: DeliverySettings | None = None
) -> dict[str, Callable[[dict], None]]:
    """The outbox's senders, by destination kind: each builds the export of its item's report
    version (the SR, with the source instance from ``studies``; the FHIR bundle) and sends it.

    Pass the result to ``Outbox.deliver_due`` or ``Deliverer``.
    """
    from edge.errors import ConflictError, InputError
    from edge.reports.exports import render

    settings = settings or DeliverySettings()

    def build(item: dict, fmt: str) -> bytes:
        report = store.get(item["report_id"], item["version"])
        replaced = store.get(item["report_id"], report["replaces"]) if report.get("replaces") else None
        try:
            return render(
                report, fmt, studies=studies, replaced=replaced, organization=settings.organization,
                institution=settings.institution, fhir_bundle=settings.fhir_bundle,
            )  # fmt: skip
        except (
            InputError,
            UsageError,
            ConflictError,
        ) as exc:  # e.g. the source study is gone: retrying can't help
            raise DeliveryFailed(f"can't build the {fmt} export: {exc}", permanent=True) from None

    def send_dicom(item: dict) -> None:
        dicom_sender(
            item, build(item, "sr"), calling_ae=settings.calling_ae_title, timeout_s=settings.timeout_s
        )

    def send_fhir(item: dict) -> None:
        fhir_sender(item, build(item, "fhir"), timeout_s=settings.timeout_s)

    return {"dicom": send_dicom, "fhir": send_fhir}
