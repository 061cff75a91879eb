"""The report store: drafts, signed versions, amendments and their audit log, in one SQLite file.

``root/reports.sqlite`` (WAL, ``synchronous=FULL``) holds three tables:

- ``versions``: one row per (report, version). Rows are only ever inserted, never deleted; a
  *draft* row is the clinician's working copy and :meth:`ReportStore.save` updates it; once
  signed it never changes. That is enforced twice: in code (every path raises
  :class:`~edge.errors.ConflictError`) and by triggers that abort any UPDATE or DELETE of a signed
  row, so not even a direct SQL write can change a signed report. An amendment is a new draft
  version whose ``replaces`` names the signed one.
- ``audit``: append-only (triggers abort UPDATE and DELETE); a row per save, sign, amend,
  export, queue and delivery, with time, version, actor and a short detail.
- ``outbox``: the delivery queue (:mod:`edge.reports.outbox`).

The schema and its triggers are in :mod:`edge.reports.db`.

Every change is one ``BEGIN IMMEDIATE`` transaction: a crash leaves the state before or after
it, never between. One connection, guarded by a lock, serves all threads; another process
(``medgemma-edge report ...`` beside ``serve``) waits for the write lock up to 30 s.
Logs carry report ids, versions and hashes, never report text or patient data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import secrets
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edge.errors import ConflictError, InputError, NotFoundError, UsageError
from edge.reports import content
from edge.reports.db import BUSY_TIMEOUT_S, DB_NAME, SCHEMA, db_error

log = logging.getLogger(__name__)

MAX_LIMIT = 200
_REPORT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def uid_hash(uid: str | None) -> str:
    """The first 12 hex digits of a UID's sha256: what logs carry instead of the UID."""
    return hashlib.sha256((uid or "").encode()).hexdigest()[:12]


def new_uid() -> str:
    """A new DICOM UID under the UUID root ``2.25`` (PS3.5 B.2), as ``pydicom.uid.generate_uid()``
    makes it with no prefix; stdlib only, so the store itself needs no DICOM library."""
    return f"2.25.{uuid.uuid4().int}"


def iso_time(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _digest(obj: Any) -> str:
    return hashlib.sha256(_dumps(obj).encode()).hexdigest()[:12]


def item_from_row(row: sqlite3.Row, sr_uid: str | None) -> dict:
    """An outbox row as the ITEM the contract describes."""
    nxt = row["next_attempt"]
    return {
        "item_id": row["item_id"],
        "report_id": row["report_id"],
        "version": row["version"],
        "destination": json.loads(row["destination"]),
        "state": row["state"],
        "attempts": row["attempts"],
        "last_error": row["last_error"],
        "next_attempt": iso_time(datetime.fromtimestamp(nxt, UTC)) if row["state"] == "queued" else None,
        "delivered_at": row["delivered_at"],
        "sop_instance_uid": sr_uid,
    }


class ReportStore:
    """Saved reports under ``root`` (``reports.sqlite``, ``exports/``); see the module docstring.

    Args:
        clock: returns the current time (a timezone-aware datetime); tests pin it.
    """

    def __init__(self, root: Path, *, clock: Callable[[], datetime] | None = None) -> None:
        self.root = Path(root)
        self._clock = clock or (lambda: datetime.now(UTC))
        self._lock = threading.RLock()
        self.wakeups: list[threading.Event] = []  # set when an outbox item is queued (Deliverer threads)
        try:
            (self.root / "exports").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"can't create the report store {self.root} ({exc.strerror or exc})") from None
        try:
            self._conn = sqlite3.connect(
                self.root / DB_NAME, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(f"BEGIN IMMEDIATE;{SCHEMA}COMMIT;")  # one transaction: all or nothing
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    # --- plumbing --------------------------------------------------------------------------------

    def now(self) -> datetime:
        return self._clock()

    def _error(self, exc: sqlite3.Error) -> Exception:
        return db_error(self.root, exc)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection inside one ``BEGIN IMMEDIATE`` transaction (committed on success, rolled
        back on any exception); SQLite errors come out as library errors. Re-entrant per thread."""
        with self._lock:
            if self._conn.in_transaction:  # nested: part of the caller's transaction
                yield self._conn
                return
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise self._error(exc) from None

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        """Rows of a read (under the lock; SQLite errors as library errors)."""
        with self._lock:
            try:
                return self._conn.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise self._error(exc) from None

    def record(self, c: sqlite3.Connection, report_id: str, version: int | None, action: str,
               *, actor: str | None = None, detail: str | None = None) -> None:  # fmt: skip
        """Append an audit row inside the caller's transaction ``c``."""
        c.execute(
            "INSERT INTO audit(report_id, version, time, action, actor, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (report_id, version, iso_time(self.now()), action, actor, detail),
        )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> ReportStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- reads -----------------------------------------------------------------------------------

    def _row(self, report_id: str, version: int | None) -> sqlite3.Row:
        if not isinstance(report_id, str) or not _REPORT_ID.fullmatch(report_id):
            raise NotFoundError(f"no report {str(report_id)[:64]!r}: report ids are letters, digits, - and _")
        if version is None:
            rows = self.query(
                "SELECT * FROM versions WHERE report_id = ? ORDER BY version DESC LIMIT 1", (report_id,)
            )
            if not rows:
                raise NotFoundError(f"no report {report_id}: list the saved reports to find its id")
            return rows[0]
        if isinstance(version, bool) or not isinstance(version, int):
            raise UsageError("version must be a whole number")
        rows = self.query("SELECT * FROM versions WHERE report_id = ? AND version = ?", (report_id, version))
        if not rows:
            latest = self._row(report_id, None)["version"]  # NotFoundError if the report is absent
            raise NotFoundError(f"report {report_id} has no version {version} (versions 1 to {latest})")
        return rows[0]

    def _report(self, row: sqlite3.Row) -> dict:
        items = self.query(
            "SELECT * FROM outbox WHERE report_id = ? AND version = ? ORDER BY item_id",
            (row["report_id"], row["version"]),
        )
        signed = row["status"] == "signed"
        return {
            "report_id": row["report_id"],
            "version": row["version"],
            "status": row["status"],
            "replaces": row["replaces"],
            "draft": json.loads(row["draft"]) if row["draft"] is not None else None,
            "final": json.loads(row["final"]),
            "source": json.loads(row["source"]),
            "provenance": json.loads(row["provenance"]),
            "signer": {"name": row["signer_name"], "role": row["signer_role"]} if signed else None,
            "signed_at": row["signed_at"],
            "created": row["created"],
            "updated": row["updated"],
            "sr_sop_instance_uid": row["sr_uid"],
            "reason": row["reason"],
            "delivery": [item_from_row(i, row["sr_uid"]) for i in items],
        }

    def get(self, report_id: str, version: int | None = None) -> dict:
        """REPORT: the given version, else the latest. NotFoundError if absent."""
        return self._report(self._row(report_id, version))

    def list(self, *, study_uid: str | None = None, image_sha256: str | None = None,
             status: str | None = None, offset: int = 0, limit: int = 50) -> dict:  # fmt: skip
        """The latest version of each report, most recently changed first, filtered by source
        study, image hash or status: ``{"reports": [REPORT...], "total", "offset", "limit"}``."""
        if status not in (None, "draft", "signed"):
            raise UsageError(f"status must be draft or signed, not {str(status)[:20]!r}")
        for name, value, top in (("offset", offset, None), ("limit", limit, MAX_LIMIT)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if top else 0):
                raise UsageError(f"{name} must be a whole number from {1 if top else 0}")
            if top and value > top:
                raise UsageError(f"limit must be at most {top}")
        where = ["v.version = (SELECT MAX(version) FROM versions WHERE report_id = v.report_id)"]
        args: list[Any] = []
        for column, value in (("study_uid", study_uid), ("image_sha256", image_sha256), ("status", status)):
            if value is not None:
                where.append(f"v.{column} = ?")
                args.append(value)
        sql = f"FROM versions v WHERE {' AND '.join(where)}"
        total = self.query(f"SELECT COUNT(*) {sql}", tuple(args))[0][0]
        rows = self.query(
            f"SELECT v.* {sql} ORDER BY v.updated DESC, v.rowid DESC LIMIT ? OFFSET ?", (*args, limit, offset)
        )
        return {"reports": [self._report(r) for r in rows], "total": total, "offset": offset, "limit": limit}

    def audit(self, report_id: str) -> list[dict]:
        """The report's audit log, oldest first: ``[{"time", "action", "version", "actor", "detail"}]``."""
        self._row(report_id, None)
        rows = self.query(
            "SELECT time, action, version, actor, detail FROM audit WHERE report_id = ? ORDER BY id",
            (report_id,),
        )
        return [dict(r) for r in rows]

    # --- changes ---------------------------------------------------------------------------------

    def save(self, *, report_id: str | None, draft: dict | None, final: dict, source: dict,
             provenance: dict, actor: str | None = None) -> dict:  # fmt: skip
        """A new report (``report_id`` None: version 1, a draft) or an update of a report's draft
        version (``draft`` None keeps the stored AI draft). REPORT.

        Raises:
            UsageError: a field does not fit the report schema, the source or the provenance.
            NotFoundError: no report ``report_id``.
            ConflictError: its latest version is signed (amend it instead).
        """
        final = content.check_final(final)
        draft = content.check_draft(draft)
        source = content.check_source(source)
        provenance = content.check_provenance(provenance)
        now = iso_time(self.now())
        fields = (
            _dumps(final), _dumps(source), _dumps(provenance),
            source.get("study_uid"), source.get("image_sha256"), now,
        )  # fmt: skip
        with self.transaction() as c:
            if report_id is None:
                report_id = f"rpt-{secrets.token_hex(8)}"
                c.execute(
                    "INSERT INTO versions(report_id, version, status, draft, final, source, provenance, "
                    "study_uid, image_sha256, updated, created) VALUES (?, 1, 'draft', ?, ?, ?, ?, ?, ?, ?, ?)",
                    (report_id, None if draft is None else _dumps(draft), *fields, now),
                )
                version, what = 1, "created"
            else:
                row = self._row(report_id, None)
                version = row["version"]
                if row["status"] == "signed":
                    raise ConflictError(
                        f"report {report_id} version {version} is signed and can't be changed; "
                        "amend it to make a new version"
                    )
                c.execute(
                    "UPDATE versions SET draft = COALESCE(?, draft), final = ?, source = ?, provenance = ?, "
                    "study_uid = ?, image_sha256 = ?, updated = ? WHERE report_id = ? AND version = ?",
                    (None if draft is None else _dumps(draft), *fields, report_id, version),
                )
                what = "updated"
            self.record(c, report_id, version, "save", actor=actor, detail=f"{what}; final {_digest(final)}")
        log.info("report %s v%d %s (final %s)", report_id, version, what, _digest(final))
        return self.get(report_id, version)

    def sign(self, report_id: str, *, version: int, signer: str, role: str) -> dict:
        """Sign a draft version: it becomes immutable, with its signer, time and the SOP Instance
        UID every DICOM SR of it will carry. REPORT.

        Raises:
            UsageError: signer or role empty or too long.
            NotFoundError: no such report or version.
            ConflictError: that version is signed already.
        """
        signer = content.check_person("signer name", signer)
        role = content.check_person("signer role", role)
        with self.transaction() as c:
            row = self._row(report_id, version)
            if row["status"] == "signed":
                raise ConflictError(
                    f"report {report_id} version {version} is already signed (at {row['signed_at']}); "
                    "amend it to make a new version"
                )
            now, sr_uid = iso_time(self.now()), new_uid()
            c.execute(
                "UPDATE versions SET status = 'signed', signer_name = ?, signer_role = ?, signed_at = ?, "
                "sr_uid = ?, updated = ? WHERE report_id = ? AND version = ?",
                (signer, role, now, sr_uid, now, report_id, version),
            )
            self.record(
                c, report_id, version, "sign", actor=signer, detail=f"role {role}; SR {uid_hash(sr_uid)}"
            )
        log.info("report %s v%d signed (SR %s)", report_id, version, uid_hash(sr_uid))
        return self.get(report_id, version)

    def amend(self, report_id: str, *, final: dict, reason: str, actor: str | None = None) -> dict:
        """A new draft version that ``replaces`` the latest (signed) one; both are kept. REPORT.

        Raises:
            UsageError: ``final`` does not fit the report schema, or no reason.
            NotFoundError: no report ``report_id``.
            ConflictError: its latest version is a draft (save that one, or sign it first).
        """
        final = content.check_final(final)
        reason = content.check_person("the reason for the amendment", reason, content.MAX_REASON)
        with self.transaction() as c:
            row = self._row(report_id, None)
            if row["status"] != "signed":
                raise ConflictError(
                    f"report {report_id} version {row['version']} is a draft: save your changes to it "
                    "(amend is for signed reports)"
                )
            version, now = row["version"] + 1, iso_time(self.now())
            c.execute(
                "INSERT INTO versions(report_id, version, status, replaces, draft, final, source, provenance, "
                "study_uid, image_sha256, reason, created, updated) "
                "SELECT report_id, ?, 'draft', version, draft, ?, source, provenance, study_uid, image_sha256, "
                "?, ?, ? FROM versions WHERE report_id = ? AND version = ?",
                (version, _dumps(final), reason, now, now, report_id, row["version"]),
            )
            self.record(
                c, report_id, version, "amend", actor=actor,
                detail=f"replaces version {row['version']}; final {_digest(final)}; reason: {reason}",
            )  # fmt: skip
        log.info("report %s amended: v%d replaces v%d", report_id, version, row["version"])
        return self.get(report_id, version)
