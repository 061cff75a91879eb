"""The SQLite catalogue of a study store: schema, connection, and the rows → JSON of the API.

```
catalogue.sqlite   WAL, synchronous=NORMAL (see connect); tables info, studies, series, instances
```

``instances`` holds one row per SOP instance (``sop_instance_uid`` UNIQUE: a duplicate is never
catalogued twice; ``sha256`` names its file ``objects/<sha[:2]>/<sha>.dcm``); ``seq`` is the
order of arrival (newest first everywhere). ``studies`` and ``series`` keep what the first
instance of each said, and a study's newest arrival (``last_seq``, ``received``, ``calling_ae``).
:mod:`edge.studies.store` owns the writes; this module only knows the file and the queries.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from edge.bundle.atomic import disk_full_error, is_disk_full
from edge.errors import Busy, InputError

DB_NAME = "catalogue.sqlite"
FORMAT = "medgemma-edge-studies/1"
BUSY_TIMEOUT_S = 30

SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS studies (
    study_uid          TEXT PRIMARY KEY,
    patient_name       TEXT NOT NULL,
    patient_id         TEXT NOT NULL,
    patient_birth_date TEXT,            -- YYYY-MM-DD
    patient_sex        TEXT NOT NULL,
    study_date         TEXT,            -- YYYY-MM-DD
    study_time         TEXT,            -- HH:MM:SS
    description        TEXT NOT NULL,
    accession          TEXT NOT NULL,
    last_seq           INTEGER NOT NULL, -- instances.seq of its newest arrival
    received           TEXT NOT NULL,    -- ISO 8601 UTC of its newest arrival
    calling_ae         TEXT NOT NULL     -- who sent its newest arrival ("" for an import)
);
CREATE INDEX IF NOT EXISTS studies_recent ON studies(last_seq);
CREATE INDEX IF NOT EXISTS studies_date ON studies(study_date);
CREATE TABLE IF NOT EXISTS series (
    series_uid  TEXT PRIMARY KEY,
    study_uid   TEXT NOT NULL,
    modality    TEXT NOT NULL,
    body_part   TEXT NOT NULL,
    number      INTEGER,
    description TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS series_study ON series(study_uid, modality);
CREATE TABLE IF NOT EXISTS instances (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid TEXT NOT NULL UNIQUE,
    study_uid        TEXT NOT NULL,
    series_uid       TEXT NOT NULL,
    sop_class_uid    TEXT NOT NULL,
    number           INTEGER,
    frames           INTEGER NOT NULL,
    rows             INTEGER,
    columns          INTEGER,
    transfer_syntax  TEXT NOT NULL,
    displayable      INTEGER NOT NULL,
    why_not          TEXT,
    sha256           TEXT NOT NULL,
    bytes            INTEGER NOT NULL,
    received         TEXT NOT NULL,
    calling_ae       TEXT NOT NULL,
    source           TEXT NOT NULL      -- dicom | import | relinked
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid, series_uid);
CREATE INDEX IF NOT EXISTS instances_sha ON instances(sha256);
"""

STUDY_COLUMNS = (
    "study_uid, patient_name, patient_id, patient_birth_date, patient_sex, study_date, study_time, "
    "description, accession, received, calling_ae"
)
INSTANCE_COLUMNS = (
    "sop_instance_uid, sop_class_uid, number, frames, rows, columns, transfer_syntax, displayable, "
    "why_not, bytes, sha256, received, series_uid"
)


def connect(path: Path) -> sqlite3.Connection:
    """A connection in WAL mode, autocommit (transactions are explicit), usable from any thread
    (callers hold the store's lock).

    ``synchronous=NORMAL``: a commit is not fsynced (about a third of the time per instance on
    a VM disk); a power cut may roll back the last rows, never damage the file. That loses
    nothing: each instance's file is fsynced, and its folder too, *before* its row commits, so a
    lost row leaves a whole file without a row, which the next store to open re-links.
    """
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def db_error(root: Path, exc: sqlite3.Error) -> Exception:
    """The library error for a SQLite failure (full disk, lock held too long, damage, I/O);
    ``exc`` itself for anything else (a bug)."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    text = str(exc)
    if is_disk_full(exc, root):
        return disk_full_error(root, "writing the study catalogue", kept="the catalogue is unchanged")
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return Busy(f"study catalogue {root / DB_NAME} is locked by another process; retry when it is done")
    if (
        code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
        or "malformed" in text
        or "not a database" in text
    ):
        return damaged_error(root, text)
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
        return InputError(
            f"can't write study catalogue {root / DB_NAME} ({text}); check the folder's permissions"
        )
    if code == sqlite3.SQLITE_IOERR:
        return InputError(f"can't read or write study catalogue {root / DB_NAME} ({text}); check the disk")
    return exc


def damaged_error(root: Path, reason: str) -> InputError:
    """The one-line error for a damaged catalogue, with the recovery (the files are the truth)."""
    return InputError(
        f"study catalogue {root / DB_NAME} is damaged ({reason}); move it aside (the stored files are kept) "
        f"and run `medgemma-edge dicom check --data {root.parent}`: it is rebuilt from the files"
    )


def study_json(row: tuple, stats: dict) -> dict:
    """A STUDY dict from a row of :data:`STUDY_COLUMNS` and its aggregate ``stats``."""
    keys = [c.strip() for c in STUDY_COLUMNS.split(",")]
    out = dict(zip(keys, row, strict=True))
    return {
        **{k: out[k] for k in keys[:9]},
        "modalities": stats.get("modalities", []),
        "body_parts": stats.get("body_parts", []),
        "series_count": stats.get("series_count", 0),
        "instance_count": stats.get("instance_count", 0),
        "displayable_count": stats.get("displayable_count", 0),
        "why_not": stats.get("why_not"),  # when none can be shown: the first instance's reason
        "received": out["received"],
        "calling_ae": out["calling_ae"],
    }


def instance_json(row: tuple) -> dict:
    """An INSTANCE dict from a row of :data:`INSTANCE_COLUMNS` (its series UID dropped)."""
    from edge.studies.instance import uid_name

    keys = [c.strip() for c in INSTANCE_COLUMNS.split(",")]
    r = dict(zip(keys, row, strict=True))
    return {
        "sop_instance_uid": r["sop_instance_uid"],
        "sop_class_uid": r["sop_class_uid"],
        "sop_class": uid_name(r["sop_class_uid"]),
        "number": r["number"],
        "frames": r["frames"],
        "rows": r["rows"],
        "columns": r["columns"],
        "transfer_syntax": r["transfer_syntax"],
        "transfer_syntax_name": uid_name(r["transfer_syntax"]),
        "displayable": bool(r["displayable"]),
        "why_not": r["why_not"],
        "bytes": r["bytes"],
        "sha256": r["sha256"],
        "received": r["received"],
    }


def study_stats(conn: sqlite3.Connection, uids: list[str]) -> dict[str, dict]:
    """Per study: modalities, body parts, series / instance / displayable counts."""
    out: dict[str, dict] = {u: {"modalities": [], "body_parts": []} for u in uids}
    if not uids:
        return out
    marks = ",".join("?" * len(uids))
    for uid, modality, body_part in conn.execute(
        f"SELECT study_uid, modality, body_part FROM series WHERE study_uid IN ({marks}) "
        "ORDER BY number IS NULL, number, series_uid",
        uids,
    ):
        s = out[uid]
        if modality and modality not in s["modalities"]:
            s["modalities"].append(modality)
        if body_part and body_part not in s["body_parts"]:
            s["body_parts"].append(body_part)
    for uid, n_series, n, shown in conn.execute(
        f"SELECT study_uid, COUNT(DISTINCT series_uid), COUNT(*), SUM(displayable) FROM instances "
        f"WHERE study_uid IN ({marks}) GROUP BY study_uid",
        uids,
    ):
        out[uid].update(series_count=n_series, instance_count=n, displayable_count=int(shown or 0))
    for uid, why in conn.execute(
        f"SELECT study_uid, MIN(why_not) FROM instances WHERE study_uid IN ({marks}) "
        "GROUP BY study_uid HAVING SUM(displayable) = 0",
        uids,
    ):
        out[uid]["why_not"] = why
    return out
