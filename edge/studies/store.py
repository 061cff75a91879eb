"""The study store: received DICOM instances, content-addressed on disk, catalogued in SQLite.

```
DATA/studies/
  objects/ab/<sha256>.dcm   each instance's bytes exactly as received (mode 0600)
  tmp/<pid>-<hex>.part      an instance being written (only while its writer lives)
  catalogue.sqlite          studies / series / instances (edge.studies.catalogue)
  .open.lock                held shared by every open store, exclusively by one sweeping litter
```

Order of a write (:meth:`StudyStore.add_bytes`): parse the facts (:mod:`edge.studies.instance`),
hash, write ``tmp/…part`` + fsync, rename into ``objects/`` + fsync the folder, *then* commit the
catalogue row. A kill before the rename leaves only a temp file (removed by the next store to
open when no other process has it open); a kill (or a power cut) between the rename and the
commit leaves a complete file without a row, which that next store re-links (and
:meth:`StudyStore.check` too). A torn write never has a row. A SOP Instance UID already
catalogued (same or other bytes) is a ``duplicate`` and changes nothing. A full disk is an
:class:`~edge.errors.ResourceError`, with nothing half-written left.

Thread-safe: the DICOM node stores from one thread per association. File writes run in
parallel (one lock per content hash keeps two writers of the same bytes apart); the catalogue
is one connection behind one lock, each write one ``BEGIN IMMEDIATE`` transaction, so other
processes (an import while ``serve`` runs) queue on SQLite's lock.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from edge.bundle.atomic import disk_full_error, is_disk_full, reporting_disk_full
from edge.errors import InputError, TooLargeError, UsageError
from edge.files import format_bytes, read_bytes
from edge.studies import catalogue as cat
from edge.studies.instance import Facts, read_facts, uid_hash
from edge.studies.reads import CatalogueReads

log = logging.getLogger(__name__)

OBJECTS = "objects"
TMP = "tmp"
OPEN_LOCK = ".open.lock"
MAX_INSTANCE_BYTES = int(os.environ.get("MEDGEMMA_EDGE_MAX_INSTANCE_BYTES", 1 << 30))  # 1 GiB


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Stored:
    """What became of one instance given to the store (a duplicate: the catalogued one's facts)."""

    status: str  # "stored" | "duplicate"
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sha256: str
    bytes: int
    displayable: bool
    why_not: str | None

    def to_json(self) -> dict:
        return asdict(self)


class StudyStore(CatalogueReads):
    """The study store under ``root`` (created if missing). Close it (or use ``with``).

    Writes are here; the catalogue queries (list_studies, get_study, instance_info,
    instance_path, first_displayable, newest, counts) are :class:`edge.studies.reads.CatalogueReads`.
    """

    def __init__(self, root: str | os.PathLike):
        import fcntl

        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"study store {self.root} exists and is not a folder")
        try:
            with reporting_disk_full(self.root.parent, f"creating study store {self.root}"):
                for d in (self.root, self.root / OBJECTS, self.root / TMP):
                    d.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise InputError(
                f"can't create the study store {self.root} ({exc.strerror or exc}); give a writable "
                "folder with --data (or $MEDGEMMA_EDGE_DATA)"
            ) from None
        self._lock = threading.RLock()
        self._sha_locks: dict[str, list] = {}  # sha -> [lock, users]
        self._sha_mutex = threading.Lock()
        try:
            self._open_fd = os.open(self.root / OPEN_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise InputError(
                f"can't open the study store {self.root} ({exc.strerror or exc}); check its permissions"
            ) from None
        try:
            fcntl.flock(self._open_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            sole = True  # no other process has the store open (others wait for LOCK_SH below)
        except BlockingIOError:
            sole = False
        try:
            if sole:
                self._sweep_temp()  # every temp file is a dead writer's
            self._open_catalogue()
            if sole:
                from edge.studies.repair import relink_orphans

                relink_orphans(self)  # whole files whose rows a kill or a power cut lost
        except BaseException:
            with contextlib.suppress(sqlite3.Error, AttributeError):
                self.conn.close()
            os.close(self._open_fd)
            self._open_fd = -1
            raise
        fcntl.flock(self._open_fd, fcntl.LOCK_SH)

    def _open_catalogue(self) -> None:
        try:
            self.conn = cat.connect(self.root / cat.DB_NAME)
        except sqlite3.Error as exc:
            err = cat.db_error(self.root, exc)
            raise (err if err is not exc else cat.damaged_error(self.root, str(exc))) from None
        with self._db():
            self.conn.execute("BEGIN IMMEDIATE")
            for stmt in cat.SCHEMA.split(";"):
                if stmt.strip():
                    self.conn.execute(stmt)
            self.conn.execute("INSERT OR IGNORE INTO info(key, value) VALUES ('format', ?)", (cat.FORMAT,))
            self.conn.execute("INSERT OR IGNORE INTO info(key, value) VALUES ('created', ?)", (_now(),))
            self.conn.execute("COMMIT")
            fmt = self.conn.execute("SELECT value FROM info WHERE key = 'format'").fetchone()[0]
        if fmt != cat.FORMAT:
            raise InputError(f"{self.root / cat.DB_NAME}: format {fmt!r} is not {cat.FORMAT!r}")

    # -- plumbing -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the catalogue and release the store (idempotent)."""
        with self._lock:
            if self._open_fd < 0:
                return
            with contextlib.suppress(sqlite3.Error):
                self.conn.close()
            os.close(self._open_fd)
            self._open_fd = -1

    def __enter__(self) -> StudyStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """The catalogue under the store's lock; SQLite failures as library errors."""
        with self._lock:
            if self._open_fd < 0:
                raise UsageError("the study store is closed")
            try:
                yield self.conn
            except sqlite3.Error as exc:
                if self.conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self.conn.execute("ROLLBACK")
                err = cat.db_error(self.root, exc)
                if err is exc:
                    raise
                raise err from None

    @contextlib.contextmanager
    def _content_lock(self, sha: str) -> Iterator[None]:
        """Serialize this process's writers of one content hash (file write through commit)."""
        with self._sha_mutex:
            entry = self._sha_locks.setdefault(sha, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._sha_mutex:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._sha_locks[sha]

    def _sweep_temp(self) -> None:
        for p in (self.root / TMP).iterdir():
            with contextlib.suppress(OSError):
                p.unlink()
                log.warning("studies: removed %s, left by an interrupted write", p.name)

    def object_path(self, sha: str) -> Path:
        """Where the instance with content hash ``sha`` lives (whether or not it exists)."""
        return self.root / OBJECTS / sha[:2] / f"{sha}.dcm"

    # -- adding ---------------------------------------------------------------------------------

    def add_bytes(
        self, data: bytes, *, calling_ae: str = "", source: str = "import", name: str = "instance"
    ) -> Stored:
        """Store one DICOM Part 10 instance (its bytes as received or read), or see it is there.

        Raises:
            InputError: not DICOM, unreadable, or missing the UIDs an instance needs.
            TooLargeError: over ``MAX_INSTANCE_BYTES``.
            ResourceError: the disk is full (nothing half-written is left).
        """
        t0 = time.perf_counter()
        data = bytes(data)
        if len(data) > MAX_INSTANCE_BYTES:
            raise TooLargeError(
                f"{name}: {format_bytes(len(data))} is over the {format_bytes(MAX_INSTANCE_BYTES)} instance limit"
            )
        facts = read_facts(data, name=name)
        sha = hashlib.sha256(data).hexdigest()
        with self._content_lock(sha):
            known = self._existing(facts.sop_instance_uid)
            if known is not None:
                log.info(
                    "studies: duplicate sop=%s (%d bytes), kept the stored one",
                    uid_hash(facts.sop_instance_uid),
                    len(data),
                )
                return known
            created = self._write_object(sha, data)
            try:
                inserted = self._insert(
                    facts, sha, len(data), calling_ae=calling_ae, source=source, received=_now()
                )
            except BaseException:
                if created:
                    with contextlib.suppress(OSError):
                        self.object_path(sha).unlink()
                raise
            if not inserted:  # another writer catalogued this UID (other bytes) in the meantime
                known = self._existing(facts.sop_instance_uid)
                if created and known is not None and known.sha256 != sha:
                    with contextlib.suppress(OSError):
                        self.object_path(sha).unlink()
                return known
        log.info(
            "studies: stored sop=%s study=%s %d bytes (%s) in %.1f ms",
            uid_hash(facts.sop_instance_uid),
            uid_hash(facts.study_uid),
            len(data),
            source,
            (time.perf_counter() - t0) * 1e3,
        )
        return _stored("stored", facts, sha, len(data))

    def add_dataset(self, ds, *, calling_ae: str = "", source: str = "dicom") -> Stored:
        """Store a pydicom Dataset (with ``file_meta``; pynetdicom's ``event.dataset`` with
        ``event.file_meta``), encoded as a Part 10 file in its own transfer syntax."""
        import io

        pydicom = require_pydicom()
        meta = getattr(ds, "file_meta", None)
        if meta is None or "TransferSyntaxUID" not in meta:
            raise InputError(
                "the dataset has no file meta with a Transfer Syntax UID; set ds.file_meta first"
            )
        buf = io.BytesIO()
        try:
            pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        except Exception as exc:
            raise InputError(f"the dataset can't be encoded as a DICOM file ({type(exc).__name__})") from None
        return self.add_bytes(buf.getvalue(), calling_ae=calling_ae, source=source)

    def add_file(self, path: str | os.PathLike, *, source: str = "import") -> Stored:
        """Store the DICOM file at ``path`` (read bounded: at most ``MAX_INSTANCE_BYTES``)."""
        data = read_bytes(path, limit=MAX_INSTANCE_BYTES, what="DICOM file")
        return self.add_bytes(data, source=source, name=str(path))

    def import_folder(
        self, directory: str | os.PathLike, *, progress: Callable[[int, int], None] | None = None
    ) -> dict:
        """Store every DICOM file under ``directory`` (recursive); skip the rest with a reason.

        Returns:
            ``{"files", "stored", "duplicates", "skipped": [[relative path, why], ...], "bytes", "seconds"}``
            (``files``: the regular files found; ``bytes``: of the instances stored).
        Raises:
            InputError: ``directory`` is missing or not a folder (FileMissing when missing).
            ResourceError: the disk filled up (what was stored before stays).
        """
        from edge.studies.ingest import import_folder

        return import_folder(self, directory, progress=progress)

    def _existing(self, sop_uid: str) -> Stored | None:
        with self._db() as c:
            row = c.execute(
                "SELECT study_uid, series_uid, sha256, bytes, displayable, why_not FROM instances "
                "WHERE sop_instance_uid = ?",
                (sop_uid,),
            ).fetchone()
        if row is None:
            return None
        study, series, sha, n, shown, why = row
        return Stored("duplicate", study, series, sop_uid, sha, n, bool(shown), why)

    def _write_object(self, sha: str, data: bytes) -> bool:
        """Put ``data`` at its content address (temp + fsync + rename + fsync the folder).
        False when it was there already (same hash: same bytes)."""
        final = self.object_path(sha)
        if final.exists():
            return False
        tmp = self.root / TMP / f"{os.getpid()}-{secrets.token_hex(8)}.part"
        renamed = False
        try:
            if not final.parent.is_dir():
                final.parent.mkdir(mode=0o700, exist_ok=True)
                _fsync_dir(final.parent.parent)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
            renamed = True
            _fsync_dir(final.parent)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if renamed:
                with contextlib.suppress(OSError):
                    final.unlink()
            if isinstance(exc, OSError) and is_disk_full(exc, self.root):
                raise disk_full_error(
                    self.root, "storing a DICOM instance", need=len(data), kept="nothing was half-written"
                ) from None
            raise
        return True

    def _insert(self, f: Facts, sha: str, size: int, *, calling_ae: str, source: str, received: str) -> bool:
        """Catalogue one instance in one transaction; False when its SOP Instance UID is there."""
        ae = (calling_ae or "").strip()[:16]
        with self._db() as c:
            c.execute("BEGIN IMMEDIATE")
            cur = c.execute(
                "INSERT OR IGNORE INTO instances(sop_instance_uid, study_uid, series_uid, sop_class_uid, number, "
                "frames, rows, columns, transfer_syntax, displayable, why_not, sha256, bytes, received, "
                "calling_ae, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    f.sop_instance_uid,
                    f.study_uid,
                    f.series_uid,
                    f.sop_class_uid,
                    f.instance_number,
                    f.frames,
                    f.rows,
                    f.columns,
                    f.transfer_syntax,
                    int(f.displayable),
                    f.why_not,
                    sha,
                    size,
                    received,
                    ae,
                    source,
                ),
            )
            if cur.rowcount != 1:
                c.execute("ROLLBACK")
                return False
            seq = cur.lastrowid
            c.execute(
                "INSERT INTO studies(study_uid, patient_name, patient_id, patient_birth_date, patient_sex, "
                "study_date, study_time, description, accession, last_seq, received, calling_ae) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(study_uid) DO UPDATE SET "
                "last_seq = excluded.last_seq, received = excluded.received, calling_ae = excluded.calling_ae",
                (
                    f.study_uid,
                    f.patient_name,
                    f.patient_id,
                    f.patient_birth_date,
                    f.patient_sex,
                    f.study_date,
                    f.study_time,
                    f.study_description,
                    f.accession,
                    seq,
                    received,
                    ae,
                ),
            )
            c.execute(
                "INSERT OR IGNORE INTO series(series_uid, study_uid, modality, body_part, number, description) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (f.series_uid, f.study_uid, f.modality, f.body_part, f.series_number, f.series_description),
            )
            c.execute("COMMIT")
        return True

    def check(self, *, verify: bool = True, repair: bool = True) -> dict:
        """Compare the catalogue with the files (see :mod:`edge.studies.repair`)."""
        from edge.studies.repair import check_store

        return check_store(self, verify=verify, repair=repair)


def require_pydicom():
    from edge.errors import require

    return require("pydicom", "dicom")


def _stored(status: str, f: Facts, sha: str, size: int) -> Stored:
    return Stored(status, f.study_uid, f.series_uid, f.sop_instance_uid, sha, size, f.displayable, f.why_not)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
