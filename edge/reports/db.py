"""The report store's SQLite file: its schema (tables, indexes, the triggers that keep signed
versions, the audit log and delivered items unchangeable) and the library errors for what can
go wrong with it. :mod:`edge.reports.store` is the store itself."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from edge.bundle.atomic import disk_full_error, is_disk_full
from edge.errors import Busy, ConflictError, InputError

DB_NAME = "reports.sqlite"
BUSY_TIMEOUT_S = 30  # how long a writer waits for another process's transaction
IMMUTABLE = "signed report versions are immutable"

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS versions (
    report_id    TEXT NOT NULL,
    version      INTEGER NOT NULL CHECK (version >= 1),
    status       TEXT NOT NULL CHECK (status IN ('draft', 'signed')),
    replaces     INTEGER,
    draft        TEXT,              -- the AI draft as generated (JSON), NULL if none
    final        TEXT NOT NULL,     -- the clinician's report (JSON)
    source       TEXT NOT NULL,     -- JSON: study/series/instance UIDs or the image sha256
    provenance   TEXT NOT NULL,     -- JSON: model, bundle, quantization, synthetic, runtime_version
    study_uid    TEXT,              -- copied out of source, for list(study_uid=)
    image_sha256 TEXT,
    reason       TEXT,              -- an amendment's reason
    signer_name  TEXT,
    signer_role  TEXT,
    signed_at    TEXT,
    sr_uid       TEXT UNIQUE,       -- the DICOM SR's SOP Instance UID, fixed at signing
    created      TEXT NOT NULL,
    updated      TEXT NOT NULL,
    PRIMARY KEY (report_id, version)
);
CREATE INDEX IF NOT EXISTS versions_study ON versions(study_uid);
CREATE INDEX IF NOT EXISTS versions_image ON versions(image_sha256);
CREATE TRIGGER IF NOT EXISTS versions_signed_no_update BEFORE UPDATE ON versions
    WHEN OLD.status = 'signed' BEGIN SELECT RAISE(ABORT, '{IMMUTABLE}'); END;
CREATE TRIGGER IF NOT EXISTS versions_signed_no_delete BEFORE DELETE ON versions
    WHEN OLD.status = 'signed' BEGIN SELECT RAISE(ABORT, '{IMMUTABLE}'); END;
CREATE TABLE IF NOT EXISTS audit (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    report_id TEXT NOT NULL,
    version   INTEGER,
    time      TEXT NOT NULL,
    action    TEXT NOT NULL,
    actor     TEXT,
    detail    TEXT
);
CREATE INDEX IF NOT EXISTS audit_report ON audit(report_id, id);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TABLE IF NOT EXISTS outbox (
    item_id      INTEGER PRIMARY KEY AUTOINCREMENT,
    report_id    TEXT NOT NULL,
    version      INTEGER NOT NULL,
    destination  TEXT NOT NULL,     -- canonical JSON (sorted keys)
    state        TEXT NOT NULL CHECK (state IN ('queued', 'delivered', 'failed')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    next_attempt REAL NOT NULL,     -- unix seconds
    lease_until  REAL,              -- a deliverer holds it until then (unix seconds)
    delivered_at TEXT,
    created      TEXT NOT NULL,
    FOREIGN KEY (report_id, version) REFERENCES versions(report_id, version)
);
CREATE UNIQUE INDEX IF NOT EXISTS outbox_once ON outbox(report_id, version, destination)
    WHERE state != 'failed';
CREATE TRIGGER IF NOT EXISTS outbox_delivered_final BEFORE UPDATE ON outbox
    WHEN OLD.state = 'delivered' BEGIN SELECT RAISE(ABORT, 'a delivered item is final'); END;
"""


def db_error(root: Path, exc: sqlite3.Error) -> Exception:
    """The library error for a SQLite failure: a trigger's refusal, a full disk, a lock held too
    long, damage, an I/O error; ``exc`` itself for anything else (a bug)."""
    text = str(exc)
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if IMMUTABLE in text:
        return ConflictError(f"{text}: amend the report to change it")
    if "append-only" in text or "is final" in text:
        return ConflictError(text)
    if is_disk_full(exc, root):
        return disk_full_error(root, f"writing the report store {root}", kept="saved reports are kept")
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return Busy(f"report store {root} is locked by another process (waited {BUSY_TIMEOUT_S} s); retry")
    if (
        code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
        or "malformed" in text
        or "not a database" in text
    ):
        return InputError(
            f"report store {Path(root) / DB_NAME} is damaged ({text}); restore it from a backup"
        )
    if code == sqlite3.SQLITE_IOERR:
        return InputError(
            f"can't read or write the report store {Path(root) / DB_NAME} ({text}); check the disk"
        )
    return exc
