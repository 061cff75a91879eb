"""Rebuilding a damaged similar-case index from what it records: :func:`repair_index`.

An index database that is truncated or corrupt can't be trusted, but most of it is usually
readable. :func:`salvage` reads what it can, read-only: the ``info`` rows (the encoder it was
bound to) and, case by case, each source path, its copy under ``files/`` and its metadata,
stepping over unreadable pages. :func:`repair_index` then embeds those images again into a new
database (each case's copy if it kept one, else its source path; copies under ``files/`` that no
readable row names are added too), with their metadata, and only then swaps it in. The damaged
file is kept beside it as ``cases.sqlite.damaged-<time>``; a crash during the repair leaves the
damaged database where it was, and the repair can be run again. Case ids are renumbered, so
the old ANN graph (:mod:`edge.cases.ann`) is removed and, for a large index, built again.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import secrets
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from edge.cases.index import DB_NAME, FILES_DIR, CaseIndex, connect, create_database, info_rows
from edge.errors import InputError, UsageError

log = logging.getLogger(__name__)

_AUTO_META = ("format", "modality")  # facts add_files records itself
_MAX_PROBES = 100_000  # ids tried one by one past unreadable pages


@dataclass
class Salvaged:
    """What could be read from a damaged database."""

    info: dict[str, str]
    cases: list[dict]  # {"id", "source", "stored", "hash", "meta"}
    recorded: int | None  # the highest id it ever gave (AUTOINCREMENT), when readable


@dataclass
class RepairReport:
    """What :func:`repair_index` did."""

    index: str
    readable: int  # cases whose row could be read
    recorded: int | None  # cases the index ever numbered (an upper bound), when readable
    added: int = 0
    from_copies: int = 0  # re-added from the index's own copy (the source path was gone)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (path, why) not re-added
    damaged_kept: str = ""
    total: int = 0

    def to_json(self) -> dict:
        return {
            **{k: v for k, v in vars(self).items() if k != "missing"},
            "missing": [{"path": p, "error": e} for p, e in self.missing],
        }


def _read_info(conn: sqlite3.Connection) -> dict[str, str]:
    try:
        return dict(conn.execute("SELECT key, value FROM info"))
    except sqlite3.Error:
        return {}


def _read_case(conn: sqlite3.Connection, case_id: int) -> dict | None:
    try:
        row = conn.execute(
            "SELECT source, stored, content_hash FROM cases WHERE id = ?", (case_id,)
        ).fetchone()
    except sqlite3.Error:
        return None
    if row is None:
        return None
    try:
        meta = dict(conn.execute("SELECT key, value FROM case_meta WHERE case_id = ?", (case_id,)))
    except sqlite3.Error:
        meta = {}
    return {"id": case_id, "source": row[0], "stored": row[1], "hash": row[2], "meta": meta}


@contextlib.contextmanager
def _readable_copy(db: Path):
    """A private copy of ``db`` (and its WAL) to read, zero-padded to the size its header claims:
    SQLite refuses a file shorter than that outright, but reads the pages a truncation left.
    The damaged file itself is never opened (even read-only, SQLite would add files beside it)."""
    tmp = db.with_name(f".{db.name}.salvage-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        shutil.copyfile(db, tmp)
        wal = db.with_name(db.name + "-wal")
        if wal.is_file():
            shutil.copyfile(wal, f"{tmp}-wal")
        with open(tmp, "r+b") as f:
            head = f.read(100)
            page = int.from_bytes(head[16:18], "big") if len(head) >= 18 else 0
            page = 65536 if page == 1 else page
            want = int.from_bytes(head[28:32], "big") * page if len(head) >= 32 else 0
            size = f.seek(0, os.SEEK_END)
            if want > size:
                f.truncate(want)  # the missing pages read as zeros: unreadable, the rest is not
        yield tmp
    finally:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{tmp}{suffix}")


def salvage(db: Path) -> Salvaged:
    """Read what is readable of a (damaged) index database, without writing to it."""
    with _readable_copy(db) as copy:
        try:
            conn = sqlite3.connect(f"file:{copy}?mode=ro", uri=True, timeout=5)
        except sqlite3.Error:
            return Salvaged({}, [], None)
        try:
            return _salvage(conn)
        finally:
            conn.close()


def _salvage(conn: sqlite3.Connection) -> Salvaged:
    info = _read_info(conn)
    try:
        top = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'cases'").fetchone()
        recorded = int(top[0]) if top and top[0] is not None else None
    except (sqlite3.Error, ValueError, TypeError):
        recorded = None
    ids: list[int] = []
    try:  # the ids alone: often still readable through the content-hash index
        ids = sorted(r[0] for r in conn.execute("SELECT id FROM cases"))
    except sqlite3.Error:
        last, probes = 0, 0
        while True:  # scan by id; past an unreadable page, probe the ids after it one at a time
            try:
                for (case_id,) in conn.execute("SELECT id FROM cases WHERE id > ? ORDER BY id", (last,)):
                    ids.append(case_id)
                    last = case_id
                break
            except sqlite3.Error:
                last += 1
                probes += 1
                if probes > _MAX_PROBES or (recorded is not None and last > recorded):
                    break
    if recorded is None and ids:
        recorded = max(ids)
    cases = [c for c in (_read_case(conn, i) for i in ids) if c is not None]
    return Salvaged(info, cases, recorded)


def repair_index(root: str | os.PathLike, *, encoder, progress=None) -> RepairReport:
    """Rebuild the index at ``root`` from the paths and copies its damaged database records.

    Args:
        encoder: the :class:`edge.medsiglip.model.MedSigLIP` it was built with (checked against
            the damaged file's ``info`` when that is readable).
        progress: ``progress(files done, files total)`` of each re-add.
    Raises:
        InputError: no index database at ``root``, or the encoder is not the one it was built with.
        UsageError: the index is not damaged.
    """
    from edge.cases.ingest import add_files

    root = Path(root)
    db = root / DB_NAME
    if not db.is_file():
        raise InputError(f"{root} has no {DB_NAME} to repair")
    try:
        with CaseIndex.open(root) as whole:
            whole.check()
    except InputError:
        pass  # damaged (or unreadable): repair it
    else:
        raise UsageError(f"index {root} is not damaged; nothing to repair")
    old = salvage(db)
    fp = old.info.get("fingerprint")
    if fp and fp != encoder.fingerprint:
        raise InputError(
            f"index {root} was built with encoder {fp} ({old.info.get('model')} {old.info.get('precision')}), "
            f"not {encoder.fingerprint}; repair it with the bundle and --precision it was built with"
        )
    rep = RepairReport(str(root), readable=len(old.cases), recorded=old.recorded)
    tmp = root / f".{DB_NAME}.repair-{os.getpid()}-{secrets.token_hex(4)}"
    create_database(tmp, info_rows(encoder))
    new = CaseIndex(root, connect(tmp), dict(info_rows(encoder)))
    try:
        groups: dict[tuple, list[tuple[Path, bool, str | None]]] = {}
        named: set[str] = set()
        for c in old.cases:
            meta = tuple(sorted((k, v) for k, v in c["meta"].items() if k not in _AUTO_META))
            copy = root / c["stored"] if c["stored"] else None
            if copy is not None:
                named.add(copy.name)
            src = Path(c["source"]) if c["source"] else None
            if src is not None and src.is_file():
                groups.setdefault((meta, copy is not None), []).append((src, False, None))
            elif copy is not None and copy.is_file():
                groups.setdefault((meta, True), []).append((copy, True, c["source"]))
            else:
                rep.missing.append((c["source"] or c["stored"] or f"case {c['id']}", "the file is gone"))
        for orphan in sorted((root / FILES_DIR).glob("*/*")):  # copies whose row was unreadable
            if orphan.is_file() and not orphan.name.startswith(".") and orphan.name not in named:
                groups.setdefault(((), True), []).append((orphan, True, None))
        for (meta, copy), items in groups.items():
            got = add_files(
                new, [p for p, _, _ in items], encoder=encoder, meta=dict(meta), copy=copy, progress=progress
            )
            rep.added += got.added
            rep.missing += got.failed
            with new._db():  # a case re-added from its copy keeps the source path it was added from
                for p, from_copy, source in items:
                    if from_copy:
                        rep.from_copies += 1
                        if source:
                            new.conn.execute(
                                "UPDATE cases SET source = ? WHERE source = ?", (source, str(p.resolve()))
                            )
        rep.total = new.count()
        new.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except BaseException:
        new.close()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{tmp}{suffix}")
        raise
    new.close()
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S")
    kept = db.with_name(f"{DB_NAME}.damaged-{stamp}")
    os.link(db, kept)  # keep the damaged file; cases.sqlite itself is never missing
    wal = db.with_name(DB_NAME + "-wal")
    if wal.exists():  # the old WAL belongs to the old file: it must not be replayed into the new one
        os.replace(wal, kept.with_name(kept.name + "-wal"))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(db.with_name(DB_NAME + "-shm"))
    os.replace(tmp, db)
    rep.damaged_kept = str(kept)
    from edge.cases import ann

    with CaseIndex.open(root) as idx:  # the old ANN named the old ids: drop it, rebuild if large
        ann.sweep(root, keep=None)
        ann.ensure(idx)
    log.info("index repair %s: %d of %d readable cases re-added", root, rep.added, rep.readable)
    return rep
