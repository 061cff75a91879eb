"""Store-and-forward delivery of signed reports: a persistent outbox in the report store's SQLite.

:meth:`Outbox.queue` records (report, version, destination) once; :meth:`Outbox.deliver_due`
sends what is due and records the outcome; :class:`Deliverer` runs that in a thread. A
destination is ``{"kind": "dicom", "host", "port", "ae_title"}`` (a PACS, C-STORE of the SR) or
``{"kind": "fhir", "url"}`` (a FHIR endpoint, POST of the Bundle JSON). The network senders live
in ``android_bridge/delivery.py``: the library only keeps the books.

Exactly once per (report, version, destination):

- a unique index refuses a second live item for the same triple (a delivered one stays, so it is
  never queued again; a ``failed`` one can be queued anew);
- before sending, an item is *claimed* (a lease of :data:`LEASE_S`, in a transaction), so two
  deliverers (``serve`` and ``medgemma-edge report send`` at once) never send it together;
- success is recorded (state ``delivered``, the audit row) in the one transaction that ends the
  claim, and a trigger keeps a delivered item from ever changing.

A crash (or a full disk) *between* the destination's success and that commit leaves the item
queued: once its lease expires it is sent again, the same SR with the same SOP Instance UID (and
the same FHIR identifiers). A PACS treats a same-UID resend as a duplicate of what it holds, a
FHIR ``transaction`` bundle creates conditionally on the identifiers; no other window exists.

A failure sets ``attempts`` + 1, ``last_error`` (one line) and the next attempt after an
exponential back-off, :data:`BACKOFF_START_S` doubling up to :data:`BACKOFF_MAX_S` (no jitter,
so tests can predict it; ``now`` is injectable). The queue is in the database: a restart of the
runtime resumes it. A sender that raises :class:`DeliveryFailed` with ``permanent=True`` (the
destination refused the document, not "unreachable") ends the item as ``failed``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime
from typing import Any

from edge.errors import EdgeError, NotFoundError, UsageError
from edge.reports.sr import require_signed
from edge.reports.store import ReportStore, iso_time, item_from_row, uid_hash

log = logging.getLogger(__name__)

BACKOFF_START_S = 5.0
BACKOFF_MAX_S = 600.0
LEASE_S = 300.0  # longer than any sender's timeouts together
MAX_ERROR = 300  # characters of last_error kept

Sender = Callable[[dict], Any]


class DeliveryFailed(EdgeError):
    """A destination did not take a report: unreachable, refused or an error status. The message is
    one line for ``last_error``; ``permanent`` means retrying can't help (the item ends failed)."""

    code = "internal"

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def backoff_s(attempts: int) -> float:
    """Seconds to wait after the ``attempts``-th failure: 5, 10, 20, ... capped at 600."""
    return min(BACKOFF_START_S * 2 ** max(attempts - 1, 0), BACKOFF_MAX_S)


def check_destination(destination: Any) -> dict:
    """A destination in canonical form, or a UsageError naming what is wrong with it."""
    if not isinstance(destination, dict) or destination.get("kind") not in ("dicom", "fhir"):
        raise UsageError(
            'destination must be {"kind": "dicom", "host", "port", "ae_title"} or {"kind": "fhir", "url"}'
        )
    if destination["kind"] == "dicom":
        host, port, ae = (
            destination.get("host"),
            destination.get("port"),
            destination.get("ae_title", "ANY-SCP"),
        )
        if not isinstance(host, str) or not 0 < len(host) <= 255 or any(c.isspace() for c in host):
            raise UsageError("destination.host must be a host name or an IP address")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise UsageError("destination.port must be a port number from 1 to 65535")
        if not isinstance(ae, str) or not 0 < len(ae.strip()) <= 16 or "\\" in ae or not ae.isprintable():
            raise UsageError("destination.ae_title must be 1 to 16 printable characters (no backslash)")
        extra = set(destination) - {"kind", "host", "port", "ae_title"}
        out = {"kind": "dicom", "host": host, "port": port, "ae_title": ae.strip()}
    else:
        url = destination.get("url")
        if not isinstance(url, str) or len(url) > 2048 or not url.startswith(("http://", "https://")):
            raise UsageError("destination.url must be an http:// or https:// URL of the FHIR endpoint")
        extra = set(destination) - {"kind", "url"}
        out = {"kind": "fhir", "url": url}
    if extra:
        raise UsageError(f"destination has unknown fields: {', '.join(sorted(map(str, extra)))[:80]}")
    return out


def describe(destination: dict) -> str:
    """A destination in one short phrase, for logs and the audit: "dicom PACS@10.0.0.5:104"."""
    if destination["kind"] == "dicom":
        return f"dicom {destination['ae_title']}@{destination['host']}:{destination['port']}"
    return f"fhir {destination['url']}"


class Outbox:
    """The delivery queue of ``store`` (the same SQLite file, the same transactions)."""

    def __init__(self, store: ReportStore) -> None:
        self.store = store
        self._listeners = store.wakeups  # shared by every Outbox of the store: any queue() wakes a Deliverer

    def _items(self, where: str = "1", args: tuple = ()) -> list[dict]:
        rows = self.store.query(
            f"SELECT o.*, v.sr_uid FROM outbox o JOIN versions v USING (report_id, version) WHERE {where} "
            "ORDER BY o.item_id",
            args,
        )
        return [item_from_row(r, r["sr_uid"]) for r in rows]

    def get(self, item_id: int) -> dict:
        """ITEM ``item_id``; NotFoundError if absent."""
        items = self._items("o.item_id = ?", (item_id,))
        if not items:
            raise NotFoundError(f"no outbox item {item_id}")
        return items[0]

    def list(self, *, state: str | None = None) -> list[dict]:
        """Every ITEM (oldest first), or those in ``state``."""
        if state is None:
            return self._items()
        return self._items("o.state = ?", (state,))

    def queue(self, report_id: str, version: int, destination: dict, *, actor: str | None = None) -> dict:
        """Queue a signed version for ``destination``, due now. An item already queued or delivered
        for the same (report, version, destination) is returned as it is, not queued twice.

        Raises:
            NotFoundError: no such report or version.
            ConflictError: the version is a draft (sign it first).
            UsageError: a malformed destination.
        """
        dest = check_destination(destination)
        key = json.dumps(dest, sort_keys=True, separators=(",", ":"))
        with self.store.transaction() as c:
            require_signed(self.store.get(report_id, version))
            row = c.execute(
                "SELECT item_id FROM outbox WHERE report_id = ? AND version = ? AND destination = ? "
                "AND state != 'failed'",
                (report_id, version, key),
            ).fetchone()
            if row is not None:
                item_id = row[0]
            else:
                now = self.store.now()
                item_id = c.execute(
                    "INSERT INTO outbox(report_id, version, destination, state, next_attempt, created) "
                    "VALUES (?, ?, ?, 'queued', ?, ?)",
                    (report_id, version, key, now.timestamp(), iso_time(now)),
                ).lastrowid
                self.store.record(
                    c, report_id, version, "queue", actor=actor, detail=f"item {item_id}: {describe(dest)}"
                )
                log.info("report %s v%d queued as item %d for %s", report_id, version, item_id, dest["kind"])
        for event in list(self._listeners):
            event.set()
        return self.get(item_id)

    def next_due(self) -> float | None:
        """Unix time of the earliest queued item's next attempt (None: nothing queued)."""
        rows = self.store.query(
            "SELECT MIN(MAX(next_attempt, COALESCE(lease_until, 0))) FROM outbox WHERE state = 'queued'"
        )
        return rows[0][0]

    def retry_now(self, item_id: int) -> dict:
        """Make a queued item due now (its back-off ends); ITEM. Other states are left as they are."""
        with self.store.transaction() as c:
            c.execute(
                "UPDATE outbox SET next_attempt = ? WHERE item_id = ? AND state = 'queued'",
                (self.store.now().timestamp(), item_id),
            )
        for event in list(self._listeners):
            event.set()
        return self.get(item_id)

    def _claim(self, now: float, limit: int, only: Collection[int] | None) -> list[int]:
        with self.store.transaction() as c:
            ids = [
                r[0]
                for r in c.execute(
                    "SELECT item_id FROM outbox WHERE state = 'queued' AND next_attempt <= ? "
                    "AND (lease_until IS NULL OR lease_until <= ?) ORDER BY next_attempt, item_id LIMIT ?",
                    (now, now, limit if only is None else -1),
                )
                if only is None or r[0] in only
            ]
            c.executemany(
                "UPDATE outbox SET lease_until = ? WHERE item_id = ?", [(now + LEASE_S, i) for i in ids]
            )
        return ids

    def deliver_due(
        self, send: Sender | Mapping[str, Sender], now: float | None = None, *, limit: int = 50,
        only: Collection[int] | None = None,
    ) -> list[dict]:  # fmt: skip
        """Send every item due at ``now`` (unix seconds; default the clock) and record each outcome.

        Args:
            send: ``send(item)``, returning on success and raising (:class:`DeliveryFailed`, or
                anything else: a bug in a sender never stops the queue) on failure; or a mapping
                from destination kind to such a callable.
            limit: the most items sent in this round.
            only: send only these item ids (when due).
        Returns:
            The ITEMs attempted, as they are afterwards.
        """
        now = time.time() if now is None else now
        out = []
        for item_id in self._claim(now, limit, only):
            item = self.get(item_id)
            sender = send.get(item["destination"]["kind"]) if isinstance(send, Mapping) else send
            t0 = time.monotonic()
            try:
                if sender is None:
                    raise DeliveryFailed(
                        f"no sender for {item['destination']['kind']} destinations in this runtime"
                    )
                sender(item)
            except Exception as exc:  # noqa: BLE001 - every failure is recorded, none stops the queue
                self._failed(item, exc, now)
            else:
                self._delivered(item, now, time.monotonic() - t0)
            out.append(self.get(item_id))
        return out

    def _delivered(self, item: dict, now: float, seconds: float) -> None:
        when = iso_time(datetime.fromtimestamp(now, UTC))
        with self.store.transaction() as c:
            c.execute(
                "UPDATE outbox SET state = 'delivered', attempts = attempts + 1, delivered_at = ?, "
                "last_error = NULL, lease_until = NULL WHERE item_id = ?",
                (when, item["item_id"]),
            )
            self.store.record(
                c, item["report_id"], item["version"], "deliver",
                detail=f"item {item['item_id']}: {describe(item['destination'])}",
            )  # fmt: skip
        log.info(
            "item %d delivered (report %s v%d, SR %s, %s) in %.0f ms", item["item_id"], item["report_id"],
            item["version"], uid_hash(item["sop_instance_uid"]), item["destination"]["kind"], seconds * 1000,
        )  # fmt: skip

    def _failed(self, item: dict, exc: Exception, now: float) -> None:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, DeliveryFailed):
            reason = f"{type(exc).__name__}: {reason}"
        reason = reason[:MAX_ERROR]
        permanent = isinstance(exc, DeliveryFailed) and exc.permanent
        attempts = item["attempts"] + 1
        with self.store.transaction() as c:
            c.execute(
                "UPDATE outbox SET attempts = ?, last_error = ?, next_attempt = ?, lease_until = NULL, "
                "state = ? WHERE item_id = ?",
                (
                    attempts,
                    reason,
                    now + backoff_s(attempts),
                    "failed" if permanent else "queued",
                    item["item_id"],
                ),
            )
            if permanent:
                self.store.record(
                    c, item["report_id"], item["version"], "fail", detail=f"item {item['item_id']}: {reason}"
                )
        log.warning(
            "item %d (%s) attempt %d failed%s: %s", item["item_id"], item["destination"]["kind"], attempts,
            " permanently" if permanent else f", next in {backoff_s(attempts):.0f} s", reason,
        )  # fmt: skip


class Deliverer:
    """A thread that runs :meth:`Outbox.deliver_due` every ``interval_s`` seconds, at once when
    something is queued, and when the earliest back-off ends. ``start()`` / ``stop()``."""

    def __init__(
        self, outbox: Outbox, senders: Sender | Mapping[str, Sender], interval_s: float = 30.0
    ) -> None:
        if not interval_s > 0:
            raise UsageError("interval_s must be more than 0")
        self.outbox, self.senders, self.interval_s = outbox, senders, float(interval_s)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self.outbox._listeners.append(self._wake)
        self._thread = threading.Thread(target=self._run, name="report-deliverer", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Run a round now (e.g. after the network came back)."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (a send in progress finishes first, bounded by the senders' timeouts)."""
        if self._thread is None:
            return
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._wake in self.outbox._listeners:
            self.outbox._listeners.remove(self._wake)
        self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.outbox.deliver_due(self.senders)
                due = self.outbox.next_due()
            except Exception:  # noqa: BLE001 - a locked or full store: log, retry next round
                log.exception("report delivery round failed; retrying in %.0f s", self.interval_s)
                due = None
            wait = self.interval_s if due is None else min(self.interval_s, max(due - time.time(), 0.05))
            self._wake.wait(wait)
