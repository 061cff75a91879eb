"""Similar-case index: MedSigLIP image embeddings of prior cases in a local, crash-safe SQLite file.

```
INDEX_DIR/
  cases.sqlite      WAL mode; tables info (key/value), cases, case_meta
  files/ab/<sha256><ext>   copies of the images, only for cases added with copy=True
```

``cases`` holds one row per image: integer id, sha256 of the file bytes (UNIQUE: a file is
never indexed twice), where it came from (``source``) or the index's own copy (``stored``),
format and size, the encoder fingerprint, and the L2-normalized embedding as packed float32.
``case_meta`` holds key/value metadata per case (``format``, DICOM ``modality`` and whatever the
caller adds), indexed for ``where`` filters.

An index is bound to one embedding space: the fingerprint of the bundle's ``medsiglip``
component and the tower precision (:attr:`edge.medsiglip.model.MedSigLIP.fingerprint`), recorded at
creation. Opening it with another encoder is refused, never mixed.

Crash safety: :meth:`CaseIndex.add` (:mod:`edge.cases.ingest`) embeds a batch, then writes it
in one transaction (:meth:`CaseIndex.insert_batch`; copies first, through a temp file and
rename). A kill at any point leaves every batch either fully there or absent; re-running the
same add skips what is there (by content hash) and adds the rest. Processes adding at once
queue on SQLite's write lock (30 s busy timeout); the UNIQUE content hash keeps them from
adding the same image twice. A new database is built under a temp name and linked into place,
so a crash while creating never leaves an empty ``cases.sqlite``.

Damage: a database that is truncated or corrupt (detected at open from its header, or by
SQLite on any read) is an :class:`edge.errors.InputError` naming it and the recovery,
``medgemma-edge index --index DIR repair`` (:mod:`edge.cases.repair`: re-index from the source
paths and copies it records); a full disk is a ResourceError naming the disk. Search is brute-force cosine over the whole matrix in numpy, loaded once and
reloaded only when the database changed (``PRAGMA data_version`` catches other processes).
From :data:`edge.cases.ann.ANN_MIN_CASES` cases on, search goes through a memory-mapped usearch
HNSW graph with an exact re-rank (:mod:`edge.cases.ann`), built and refreshed after each add.
Export/import (moving an index between devices) lives in :mod:`edge.cases.transfer`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge.bundle.atomic import disk_full_error, is_disk_full, reporting_disk_full
from edge.cases.db import (  # DB_NAME, SCHEMA, connect: also imported from here by callers
    DB_NAME,
    SCHEMA,
    connect,
    create_database,
    damaged_error,
    db_error,
    header_damage,
)
from edge.errors import InputError, UsageError

if TYPE_CHECKING:
    from edge.cases.ingest import AddReport

log = logging.getLogger(__name__)

FORMAT = "medgemma-edge-cases/1"
FILES_DIR = "files"


def info_rows(encoder) -> list[tuple[str, str]]:
    """The ``info`` rows that bind a new index to ``encoder``."""
    return [
        ("format", FORMAT),
        ("fingerprint", encoder.fingerprint),
        ("precision", encoder.precision),
        ("dim", str(encoder.dim)),
        ("model", str(encoder.bundle.component("medsiglip").get("model", "medsiglip"))),
        ("created", _now()),
    ]


@dataclass
class Entry:
    """One search hit. ``content`` is where the image is: the index's copy, else its source path."""

    id: int
    score: float  # cosine similarity of the L2-normalized embeddings, -1..1
    content: str | None
    metadata: dict[str, str]
    content_hash: str = ""
    created: str = ""

    def to_json(self) -> dict:
        return vars(self).copy()


def parse_pairs(items: Iterable[str] | None, what: str = "--meta") -> dict[str, str]:
    """``["k=v", ...]`` → dict; UsageError naming the bad item."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{what} wants key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class CaseIndex:
    """A similar-case index directory bound to one encoder fingerprint. Use :meth:`open`."""

    def __init__(self, root: Path, conn: sqlite3.Connection, info: dict[str, str]):
        self.root = root
        self.conn = conn
        self.info = info
        self._lock = threading.RLock()
        self._writes = 0
        self._cache: tuple[tuple, np.ndarray, np.ndarray] | None = None  # (version, ids, matrix)
        self._buf: tuple[np.ndarray, np.ndarray] | None = None  # the cache's storage, with headroom
        from edge.cases.ann import ANN_MIN_CASES

        self.ann_min_cases = ANN_MIN_CASES  # search through the ANN from this many cases on
        self._ann_view = None  # (file name, memory-mapped usearch graph), see edge.cases.ann

    # -- opening -----------------------------------------------------------------------------------

    @classmethod
    def open(
        cls, root: str | os.PathLike, *, encoder=None, fingerprint: str | None = None, create: bool = False
    ) -> CaseIndex:
        """Open (or with ``create`` make) the index at ``root``.

        Args:
            encoder: a :class:`edge.medsiglip.model.MedSigLIP`; its fingerprint must match the index's.
            fingerprint: the same check without an encoder (None and no encoder: no check).
            create: make the directory and database if missing, bound to the encoder.
        Raises:
            InputError: no index there (and not ``create``), not an index, or another encoder's.
        """
        root = Path(root)
        db = root / DB_NAME
        if not db.is_file():
            if not create:
                raise InputError(
                    f"{root} is not a case index (no {DB_NAME}); create it with `medgemma-edge index "
                    f"--index {root} add FILES`"
                )
            if encoder is None:
                raise UsageError("creating an index needs the encoder it will be bound to")
            if root.exists() and not root.is_dir():
                raise InputError(f"{root} exists and is not a directory")
            with reporting_disk_full(root.parent, f"creating case index {root}"):
                root.mkdir(parents=True, exist_ok=True)
                create_database(db, info_rows(encoder))
        elif (damage := header_damage(db)) is not None:
            raise damaged_error(root, damage)
        conn = None
        try:
            conn = connect(db)
            conn.executescript(SCHEMA)
            if encoder is not None:
                conn.executemany("INSERT OR IGNORE INTO info(key, value) VALUES (?, ?)", info_rows(encoder))
            info = dict(conn.execute("SELECT key, value FROM info"))
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            err = db_error(root, exc)
            if err is exc:
                err = damaged_error(root, str(exc))
            raise err from None
        if info.get("format") != FORMAT:
            conn.close()
            if not info:
                raise damaged_error(root, "it has no index information")
            raise InputError(
                f"{db}: format {info.get('format')!r} is not {FORMAT!r}; this runtime can't use it"
            )
        want = encoder.fingerprint if encoder is not None else fingerprint
        if want is not None and info["fingerprint"] != want:
            conn.close()
            raise InputError(
                f"index {root} was built with another MedSigLIP encoder (fingerprint {info['fingerprint']}, "
                f"{info.get('model')} {info.get('precision')}); this bundle's is {want}: use the bundle "
                "it was built with, or build a new index"
            )
        return cls(root, conn, info)

    @contextlib.contextmanager
    def _db(self) -> Iterator[None]:
        """This index's lock, and SQLite failures as library errors (damage, full disk, busy)."""
        with self._lock:
            try:
                yield
            except sqlite3.Error as exc:
                err = db_error(self.root, exc)
                if err is exc:
                    raise
                raise err from None

    def check(self) -> None:
        """Read every page (``PRAGMA quick_check``): InputError with the recovery when damaged.
        Linear in the database's size (about a second per GB)."""
        with self._db():
            rows = [r[0] for r in self.conn.execute("PRAGMA quick_check(3)")]
        if rows != ["ok"]:
            raise damaged_error(self.root, "; ".join(rows))

    def close(self) -> None:
        with self._lock:
            self._ann_view = None
            self.conn.close()

    def __enter__(self) -> CaseIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def fingerprint(self) -> str:
        return self.info["fingerprint"]

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    def count(self) -> int:
        with self._db():
            return self.conn.execute("SELECT COUNT(*) FROM cases").fetchone()[0]

    def has(self, content_hash: str) -> bool:
        with self._db():
            row = self.conn.execute("SELECT 1 FROM cases WHERE content_hash = ?", (content_hash,))
            return row.fetchone() is not None

    # -- adding ------------------------------------------------------------------------------------

    def add(self, sources: Iterable[str | os.PathLike], *, encoder, **options) -> AddReport:
        """Index image files and folders (recursive), one transaction per batch; resumable.

        The database is checked first (:meth:`check`). A full disk is a ResourceError naming it;
        the batches committed before it stay, the half-written copies of this call are removed.

        See :func:`edge.cases.ingest.add_files` for the options (meta, copy, batch_size,
        cancel, progress, on_added) and what is skipped.
        """
        from edge.cases import ann
        from edge.cases.ingest import add_files

        self.check()  # never write into a damaged database: it would spread the damage
        try:
            rep = add_files(self, sources, encoder=encoder, **options)
            ann.ensure(self)  # past the threshold: build the ANN, or fold in what was added
            return rep
        except OSError as exc:
            if not is_disk_full(exc, self.root):
                raise
            self._remove_temp_copies()
            raise disk_full_error(
                self.root, f"adding to case index {self.root}", kept="committed cases are kept"
            ) from None
        except BaseException:
            self._remove_temp_copies()
            raise

    def _remove_temp_copies(self) -> None:
        """Remove the half-written copies (``files/*/.NAME.tmp-PID``) this process left."""
        for tmp in (self.root / FILES_DIR).glob(f"*/.*.tmp-{os.getpid()}"):
            with contextlib.suppress(OSError):
                tmp.unlink()

    def insert_batch(
        self, rows: list[dict], embeddings: np.ndarray, *, meta: dict[str, str], on_row=None
    ) -> int:
        """Write one batch in one transaction: all of it, or (on any error or kill) none of it.

        ``rows``: dicts with hash, source, stored, format, size (w, h), facts (metadata).
        ``embeddings``: ``[len(rows), D]`` float32, L2-normalized. A row whose bytes are already
        indexed (another process got there first) is skipped. ``on_row()`` runs after each
        inserted row, inside the transaction. Returns how many rows were inserted.
        """
        t0 = time.perf_counter()
        created = _now()
        inserted = 0
        with self._db():
            cur = self.conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                for r, e in zip(rows, embeddings, strict=True):
                    cur.execute(
                        "INSERT OR IGNORE INTO cases(content_hash, source, stored, format, width, height, "
                        "fingerprint, embedding, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            r["hash"],
                            r["source"],
                            r["stored"],
                            r["format"],
                            int(r["size"][0]),
                            int(r["size"][1]),
                            self.fingerprint,
                            np.ascontiguousarray(e, dtype="<f4").tobytes(),
                            created,
                        ),
                    )
                    if cur.rowcount != 1:
                        continue
                    cur.executemany(
                        "INSERT INTO case_meta(case_id, key, value) VALUES (?, ?, ?)",
                        [(cur.lastrowid, k, v) for k, v in {**r["facts"], **meta}.items()],
                    )
                    inserted += 1
                    if on_row:
                        on_row()
                cur.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already (disk full)
                    cur.execute("ROLLBACK")
                raise
            self._writes += 1
        log.info(
            "index: committed %d of a batch of %d in %.2fs", inserted, len(rows), time.perf_counter() - t0
        )
        return inserted

    # -- searching ---------------------------------------------------------------------------------

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """Every case's id and embedding: (ids [N] int64, embeddings [N, D] float32, L2-normalized).

        What :meth:`search` ranks, for callers that score the cases themselves (clustering, a
        benchmark's exact baseline). Cached until the database changes, through this connection
        or another (``PRAGMA data_version``). ids only grow (AUTOINCREMENT) and ``add`` only
        appends, so a change is read incrementally into spare capacity of the cached buffers (no
        copy of the matrix); a deletion (the counts disagree) reloads it all. The arrays returned
        are views that later refreshes never write into: treat them as read-only.
        """
        with self._db():
            version = (self.conn.execute("PRAGMA data_version").fetchone()[0], self._writes)
            if self._cache is not None and self._cache[0] == version:
                return self._cache[1], self._cache[2]
            t0 = time.perf_counter()
            have = len(self._cache[1]) if self._cache is not None else 0
            last = int(self._cache[1][-1]) if have else 0
            total = self.conn.execute("SELECT COUNT(*) FROM cases").fetchone()[0]  # via the hash index
            new = self.conn.execute("SELECT COUNT(*) FROM cases WHERE id > ?", (last,)).fetchone()[0]
            if total != have + new:  # something was removed: start again
                have, last, self._buf = 0, 0, None
            self._grow(have + new, keep=have)
            ids_buf, mat_buf = self._buf
            rows = self.conn.execute("SELECT id, embedding FROM cases WHERE id > ? ORDER BY id", (last,))
            n = have
            for case_id, blob in rows:
                if n == len(ids_buf):  # rows committed between the counts and this read
                    self._grow(n + 1, keep=n)
                    ids_buf, mat_buf = self._buf
                ids_buf[n] = case_id
                mat_buf[n] = np.frombuffer(blob, dtype="<f4")
                n += 1
            self._cache = (version, ids_buf[:n], mat_buf[:n])
            log.info(
                "index: %d embeddings (%d read) in %.0f ms", n, n - have, (time.perf_counter() - t0) * 1e3
            )
            return self._cache[1], self._cache[2]

    def _grow(self, need: int, *, keep: int) -> None:
        """Make the cache buffers hold ``need`` rows (with headroom), keeping the first ``keep``."""
        if self._buf is not None and len(self._buf[0]) >= need:
            return
        # headroom so that the next adds fit without a copy (untouched pages cost no RAM on Linux)
        cap = max(16, int(need * 1.25), int(len(self._buf[0]) * 1.5) if self._buf is not None else 0)
        ids = np.empty(cap, dtype=np.int64)
        mat = np.empty((cap, self.dim), dtype=np.float32)
        if self._buf is not None and keep:
            ids[:keep], mat[:keep] = self._buf[0][:keep], self._buf[1][:keep]
        self._buf = (ids, mat)

    def _filter_ids(self, where: dict[str, str]) -> set[int]:
        ids: set[int] | None = None
        with self._db():
            for k, v in where.items():
                got = {
                    r[0]
                    for r in self.conn.execute(
                        "SELECT case_id FROM case_meta WHERE key=? AND value=?", (k, v)
                    )
                }
                ids = got if ids is None else ids & got
        return ids or set()

    def search(self, query: np.ndarray, *, k: int = 5, where: dict[str, str] | None = None) -> list[Entry]:
        """Top-``k`` cases by cosine similarity to the normalized ``query`` ``[D]``.

        Args:
            where: metadata filters, all must match (``{"modality": "CT"}``).
        Raises:
            UsageError: k < 1, or a query of the wrong dimension.
            InputError: the index is empty.
        """
        check_k(k)
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise UsageError(f"query has {q.shape[0]} dimensions, the index {self.dim}")
        q = q / (np.linalg.norm(q) or 1.0)
        from edge.cases import ann

        if (hits := ann.search(self, q, k, where)) is not None:  # a large index: never the whole matrix
            return self._entries(hits)
        ids, mat = self.embeddings()
        if len(ids) == 0:
            self._require_cases()
        t0 = time.perf_counter()
        scores = mat @ q  # [N]
        if where:
            keep = np.isin(ids, np.fromiter(self._filter_ids(where), dtype=np.int64))
            scores = np.where(keep, scores, -np.inf)
            k = min(k, int(keep.sum()))
        k = min(k, len(ids))
        if k == 0:
            return []
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        log.info("index: searched %d vectors in %.1f ms", len(ids), (time.perf_counter() - t0) * 1e3)
        return self._entries([(int(ids[i]), float(scores[i])) for i in top])

    def _entries(self, hits: list[tuple[int, float]]) -> list[Entry]:
        out = []
        with self._db():
            for case_id, score in hits:
                src, stored, digest, created = self.conn.execute(
                    "SELECT source, stored, content_hash, created FROM cases WHERE id = ?", (case_id,)
                ).fetchone()
                meta = dict(
                    self.conn.execute(
                        "SELECT key, value FROM case_meta WHERE case_id = ? ORDER BY key", (case_id,)
                    )
                )
                content = str(self.root / stored) if stored else src
                out.append(Entry(case_id, score, content, meta, digest, created))
        return out

    def search_image(self, image, *, encoder, k: int = 5, where: dict[str, str] | None = None) -> list[Entry]:
        """Cases most like ``image`` (path, bytes, PIL or LoadedImage)."""
        check_k(k)
        self._check_encoder(encoder)
        return self.search(encoder.embed_images([image], batch_size=1)[0], k=k, where=where)

    def search_text(
        self, text: str, *, encoder, k: int = 5, where: dict[str, str] | None = None
    ) -> list[Entry]:
        """Cases whose images are most like ``text`` (through the text tower)."""
        check_k(k)
        if not text or not text.strip():
            raise UsageError("give a non-empty --text query")
        self._check_encoder(encoder)
        return self.search(encoder.embed_texts([text])[0], k=k, where=where)

    def _require_cases(self) -> None:
        if self.count() == 0:
            raise InputError(
                f"index {self.root} is empty; add images first: medgemma-edge index --index {self.root} add FOLDER"
            )

    def _check_encoder(self, encoder) -> None:
        self._require_cases()
        if encoder.fingerprint != self.fingerprint:
            raise InputError(
                f"index {self.root} was built with encoder {self.fingerprint}, not {encoder.fingerprint}; "
                "use the bundle it was built with"
            )

    def stats(self) -> dict:
        """Non-identifying facts: count, encoder, created, metadata keys with their counts."""
        with self._db():
            keys = dict(self.conn.execute("SELECT key, COUNT(*) FROM case_meta GROUP BY key ORDER BY key"))
        from edge.cases import ann

        st = ann.state(self)
        return {
            "index": str(self.root),
            "cases": self.count(),
            **{k: v for k, v in self.info.items() if k != ann.INFO_KEY},
            "metadata_keys": keys,
            "ann": st.to_json() if st else None,
        }


def check_k(k) -> None:
    """UsageError unless ``k`` is a whole number ≥ 1."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UsageError(f"k must be a whole number of at least 1 (got {k})")
