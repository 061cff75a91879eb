"""Consistency of a study store: the catalogue's rows against the files under ``objects/``.

:func:`check_store` (``StudyStore.check``, ``medgemma-edge dicom check``) finds

* **missing**: a row whose file is gone, and **mismatched**: a row whose file has another size or
  hash (damage on the disk). With ``repair`` the row is removed, so that the sender's next push
  stores the instance again (a damaged file is moved to ``damaged/``, never deleted);
* **orphans**: a complete file without a row: a writer killed (or a power cut) between the
  rename and the commit, or a catalogue rebuilt from scratch (move a damaged
  ``catalogue.sqlite`` aside and open the store). With ``repair`` each is parsed and catalogued
  again (``source`` "relinked", its received time the file's mtime); one whose UID is
  catalogued under another file is removed. :func:`relink_orphans` also runs whenever a store
  opens with no other process holding it.

The files are the truth: every one of them was written whole (fsync + rename) before any row.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from edge.errors import EdgeError
from edge.files import read_bytes
from edge.studies.instance import read_facts

if TYPE_CHECKING:
    from edge.studies.store import StudyStore

log = logging.getLogger(__name__)

_SHA = re.compile(r"[0-9a-f]{64}")
DAMAGED = "damaged"


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_store(store: StudyStore, *, verify: bool = True, repair: bool = True) -> dict:
    """Check (and with ``repair`` fix) ``store``; see the module docstring.

    Args:
        verify: re-hash every file (reads the whole store); else compare sizes only.
    Returns:
        ``{"ok", "instances", "missing", "mismatched", "orphans", "relinked", "removed",
        "unreadable", "seconds"}``: ``ok`` is True when nothing is (or remains) wrong; the lists
        hold ``{"sop_instance_uid", "study_uid", "sha256"}`` for rows, ``{"sha256"}`` for files.
    """
    t0 = time.perf_counter()
    with store._db() as c:
        rows = c.execute("SELECT sop_instance_uid, study_uid, sha256, bytes FROM instances").fetchall()
    missing, mismatched = [], []
    for uid, study, sha, size in rows:
        path = store.object_path(sha)
        item = {"sop_instance_uid": uid, "study_uid": study, "sha256": sha}
        try:
            st = path.stat()
        except FileNotFoundError:
            missing.append(item)
            continue
        if st.st_size != size or (verify and _file_sha(path) != sha):
            mismatched.append(item)
    if repair and (missing or mismatched):
        _drop_rows(store, missing, mismatched)

    orphans, relinked, removed, unreadable = relink_orphans(store, repair=repair)
    out = {
        "ok": not (missing or mismatched or orphans or unreadable),
        "instances": len(rows) - (len(missing) + len(mismatched) if repair else 0) + len(relinked),
        "missing": missing,
        "mismatched": mismatched,
        "orphans": orphans,
        "relinked": relinked,
        "removed": removed,
        "unreadable": unreadable,
        "repaired": repair,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if repair and (missing or mismatched):
        out["ok"] = not (orphans or unreadable)  # the bad rows are gone; their senders can push again
    log.info(
        "studies: check of %d rows: %d missing, %d mismatched, %d orphans relinked, %d removed, %d unreadable",
        len(rows),
        len(missing),
        len(mismatched),
        len(relinked),
        len(removed),
        len(unreadable),
    )
    return out


def relink_orphans(store: StudyStore, *, repair: bool = True) -> tuple[list, list, list, list]:
    """Catalogue the files under ``objects/`` that have no row (oldest first, so the order of
    arrival is kept); with ``repair`` False only list them.

    Returns:
        ``(orphans, relinked, removed, unreadable)``: orphans left as they are (no repair),
        files re-linked, stale copies of an instance catalogued under another file (removed),
        files that can't be parsed or whose content doesn't match their name (left, reported).
    """
    from edge.studies.store import MAX_INSTANCE_BYTES, OBJECTS

    with store._db() as c:
        known = {r[0] for r in c.execute("SELECT sha256 FROM instances")}
    files = sorted(
        (p for p in (store.root / OBJECTS).glob("*/*.dcm") if _SHA.fullmatch(p.stem) and p.stem not in known),
        key=lambda p: p.stat().st_mtime,
    )
    orphans, relinked, removed, unreadable = [], [], [], []
    for path in files:
        sha = path.stem
        with store._content_lock(sha):  # a live writer of this content finishes its commit first
            with store._db() as c:
                if c.execute("SELECT 1 FROM instances WHERE sha256 = ?", (sha,)).fetchone():
                    continue
            if not repair:
                orphans.append({"sha256": sha})
                continue
            try:
                data = read_bytes(path, limit=MAX_INSTANCE_BYTES, what="stored instance")
                if hashlib.sha256(data).hexdigest() != sha:
                    raise EdgeError("its content does not match its name")
                facts = read_facts(data, name="stored instance")
            except (EdgeError, OSError) as exc:
                log.warning("studies: orphan %s can't be re-linked (%s)", sha[:12], type(exc).__name__)
                unreadable.append({"sha256": sha})
                continue
            if store._existing(facts.sop_instance_uid) is not None:
                with contextlib.suppress(OSError):
                    path.unlink()
                removed.append({"sha256": sha})
                continue
            mtime = _dt.datetime.fromtimestamp(path.stat().st_mtime, _dt.UTC)
            received = mtime.isoformat(timespec="milliseconds").replace("+00:00", "Z")
            store._insert(facts, sha, len(data), calling_ae="", source="relinked", received=received)
            relinked.append(
                {"sha256": sha, "sop_instance_uid": facts.sop_instance_uid, "study_uid": facts.study_uid}
            )
    if relinked or removed:
        log.warning(
            "studies: re-linked %d instances whose catalogue rows were lost (interrupted writes), removed %d stale copies",
            len(relinked),
            len(removed),
        )
    return orphans, relinked, removed, unreadable


def _drop_rows(store: StudyStore, missing: list[dict], mismatched: list[dict]) -> None:
    """Remove the rows of missing and damaged files (damaged files move to ``damaged/``), and
    the series and studies left without instances; refresh the studies' newest arrival."""
    for item in mismatched:
        src = store.object_path(item["sha256"])
        dst = store.root / DAMAGED / src.name
        with contextlib.suppress(OSError):
            dst.parent.mkdir(mode=0o700, exist_ok=True)
            os.replace(src, dst)
    uids = [i["sop_instance_uid"] for i in missing + mismatched]
    studies = sorted({i["study_uid"] for i in missing + mismatched})
    with store._db() as c:
        c.execute("BEGIN IMMEDIATE")
        c.executemany("DELETE FROM instances WHERE sop_instance_uid = ?", [(u,) for u in uids])
        c.execute("DELETE FROM series WHERE series_uid NOT IN (SELECT series_uid FROM instances)")
        c.execute("DELETE FROM studies WHERE study_uid NOT IN (SELECT study_uid FROM instances)")
        for s in studies:
            c.execute(
                "UPDATE studies SET last_seq = (SELECT MAX(seq) FROM instances WHERE study_uid = ?1), "
                "received = (SELECT received FROM instances WHERE study_uid = ?1 ORDER BY seq DESC LIMIT 1) "
                "WHERE study_uid = ?1",
                (s,),
            )
        c.execute("COMMIT")
    log.warning("studies: removed %d catalogue rows whose files were missing or damaged", len(uids))
