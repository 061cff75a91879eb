"""The SQLite file under a similar-case index: its schema, connections, atomic creation, and the
library errors for what can go wrong with it (damage, a full disk, a lock held too long).

:mod:`edge.cases.index` is the index itself; this module only knows the file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
from pathlib import Path

from edge.bundle.atomic import disk_full_error, is_disk_full
from edge.errors import Busy, InputError

DB_NAME = "cases.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cases (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, kept by export/import
    content_hash TEXT NOT NULL UNIQUE,   -- sha256 of the file's bytes
    source       TEXT,                   -- absolute path it was added from
    stored       TEXT,                   -- its copy under files/ (copy policy), else NULL
    format       TEXT NOT NULL,
    width        INTEGER NOT NULL,
    height       INTEGER NOT NULL,
    fingerprint  TEXT NOT NULL,          -- the encoder's (bundle component + precision)
    embedding    BLOB NOT NULL,          -- float32 little-endian, L2-normalized
    created      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS case_meta (
    case_id INTEGER NOT NULL REFERENCES cases(id) ON DELETE CASCADE,
    key     TEXT NOT NULL,
    value   TEXT NOT NULL,
    PRIMARY KEY (case_id, key)
);
CREATE INDEX IF NOT EXISTS case_meta_kv ON case_meta(key, value);
"""


BUSY_TIMEOUT_S = 30  # how long a writer waits for another process's transaction


def connect(path: Path) -> sqlite3.Connection:
    """A connection in WAL mode with foreign keys on; autocommit (transactions are explicit)."""
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def damaged_error(root: Path, reason: str) -> InputError:
    """The one-line error for a damaged database, with the recovery."""
    return InputError(
        f"case index {Path(root) / DB_NAME} is damaged ({reason}); rebuild it from the image paths and "
        f"copies it records: medgemma-edge index -b BUNDLE --index {root} repair"
    )


def db_error(root: Path, exc: sqlite3.Error) -> Exception:
    """The library error for a SQLite failure: a full disk, a lock held too long, damage, an I/O
    error; ``exc`` itself for anything else (a bug)."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    text = str(exc)
    if is_disk_full(exc, root):
        return disk_full_error(root, f"writing case index {root}", kept="committed cases are kept")
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return Busy(
            f"case index {root} is locked by another process (waited {BUSY_TIMEOUT_S} s); retry when it is done"
        )
    if (
        code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
        or "malformed" in text
        or "not a database" in text
    ):
        return damaged_error(root, text)
    if code == sqlite3.SQLITE_IOERR:
        return InputError(f"can't read or write case index {Path(root) / DB_NAME} ({text}); check the disk")
    return exc


def header_damage(db: Path) -> str | None:
    """What the first 100 bytes of a SQLite file say is wrong with it (cheap: no page is read);
    None when it looks whole. The page count is checked only without a WAL beside it (a crash in
    a checkpoint may leave the main file short, and the WAL completes it)."""
    try:
        size = db.stat().st_size
        with open(db, "rb") as f:
            head = f.read(100)
    except OSError as exc:
        return f"can't read it: {exc.strerror}"
    if size == 0:
        return "the file is empty (truncated to 0 bytes)"
    if len(head) < 100 or not head.startswith(b"SQLite format 3\0"):
        return "not a SQLite database (its header is gone)"
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    pages = int.from_bytes(head[28:32], "big")
    valid = head[24:28] == head[92:96]  # the in-header size is trusted only when this matches
    wal = db.with_name(db.name + "-wal")
    if valid and pages and size < pages * page and not (wal.exists() and wal.stat().st_size > 0):
        return f"truncated: {size} bytes, its header says {pages * page}"
    return None


def create_database(db: Path, info: list[tuple[str, str]]) -> None:
    """Make an index database at ``db`` with ``info``: built under a temp name, then linked into
    place, so it appears complete or not at all. Another process that created it first wins (its
    database is kept; its encoder is checked when this one opens it)."""
    tmp = db.with_name(f".{db.name}.new-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        conn = connect(tmp)
        try:
            conn.executescript(SCHEMA)
            conn.executemany("INSERT INTO info(key, value) VALUES (?, ?)", info)
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()  # the last connection: the WAL is merged and removed
        with contextlib.suppress(FileExistsError):
            os.link(tmp, db)
    except sqlite3.Error as exc:
        err = db_error(db.parent, exc)
        raise (err if err is not exc else InputError(f"can't create {db}: {exc}")) from None
    finally:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{tmp}{suffix}")
