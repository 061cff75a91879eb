"""Approximate nearest-neighbour search for a large similar-case index (usearch HNSW, exact re-rank).

Brute force over the float32 matrix is exact and fast up to ~10^5 cases, but 10^6 cases of
MedSigLIP's 1152 dims are 4.6 GB of RAM, more than a phone has. Above :data:`ANN_MIN_CASES` an
index keeps, beside ``cases.sqlite``, one HNSW graph over int8 (or f16) copies of the vectors::

  INDEX_DIR/ann-<max id>-<token>.usearch    usearch's file, opened memory-mapped (``view``)

and :func:`search` asks it for a few dozen candidates, then re-ranks them exactly with their
float32 vectors read from SQLite by id (the scores are the exact cosines brute force would give;
only which cases become candidates is approximate). Cases added after the graph was built (ids
above its ``max_id``) are scored exactly beside it; :func:`ensure` (run after every ``add`` and
import) rebuilds the graph when that tail grows past :data:`TAIL_FRACTION` of it (and :data:`TAIL_MIN`).

Metadata filters: candidates are filtered in SQL; too few matches → fetch more candidates
(x4 each time); past :data:`MAX_CANDIDATES` the filtered subset is searched exactly instead.

Crash safety: the graph is written to a temp file, fsynced, renamed to a new generation name and
named in the ``info`` row ``ann`` in one transaction, all under SQLite's write lock; the previous
file is removed only after the commit. A kill at any point leaves the row naming a whole file
(the old one until the commit); files no row names are removed by the next build. A searcher
that still maps an old file keeps reading it (Linux keeps unlinked files alive) and moves to the
new one on its next query. A row naming a missing or damaged file falls back to exact search
with a warning, and the next :func:`ensure` rebuilds it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge.files import pid_alive

log = logging.getLogger(__name__)

# the index searches through the ANN at or above this many cases (exact below)
ANN_MIN_CASES = int(os.environ.get("MEDGEMMA_EDGE_ANN_MIN_CASES", 50_000))
DTYPES = ("i8", "f16")
DEFAULT_DTYPE = os.environ.get("MEDGEMMA_EDGE_ANN_DTYPE", "i8")
# HNSW "M". 16 loses whole clusters at 10^6 cases: embeddings form many tight clusters, and at
# M=16 a cluster's links at the lower levels all stay inside it, so a query whose greedy descent
# lands in the wrong cluster never leaves it. Measured (usearch i8, 2x10^5 clustered vectors in
# 10^4 clusters of 20, 128 candidates re-ranked, ef 128): recall@10 0.959 at M=16 (1.5% of queries
# below 0.5), 0.998 at M=32, same build time; the graph grows by 128 bytes per case.
CONNECTIVITY = int(os.environ.get("MEDGEMMA_EDGE_ANN_M", 32))
EXPANSION_ADD = 64  # efConstruction (128 builds twice as slowly for no recall after the re-rank)
# ef at query time (at least the candidates asked for), and the candidates re-ranked exactly per
# query (int8 alone orders the top-10 of a cluster poorly); benchmarks/bench_archive.py --sweep.
# At 10^6 clustered cases (M=32) ef 128 gave recall@10 0.953, ef 256 0.970 (p50 7-12 ms either way
# on 2 cores); at 10^5 both 1.000, ef 256 costing ~1 ms more.
EXPANSION_SEARCH = int(os.environ.get("MEDGEMMA_EDGE_ANN_EF", 256))
CANDIDATES = int(os.environ.get("MEDGEMMA_EDGE_ANN_CANDIDATES", 128))
MAX_CANDIDATES = 16_384  # past this a filtered search scores the filtered subset exactly
TAIL_FRACTION = 0.05  # rebuild when cases outside the graph exceed this share of it
TAIL_MIN = 1000  # ... and this many (they are scored exactly beside the graph meanwhile)
CHUNK = 8192  # vectors read from SQLite per step of a build or an exact subset scan
INFO_KEY = "ann"
FILE_RE = re.compile(r"^ann-[0-9]+-[0-9a-f]{8}\.usearch$")
_TMP_RE = re.compile(r"^\.ann\.tmp-([0-9]+)-[0-9a-f]{8}$")


@dataclass(frozen=True)
class AnnState:
    """The ``ann`` info row: which file, over which cases, built how."""

    file: str
    dtype: str
    cases: int  # vectors in the graph
    max_id: int  # every case with id <= max_id is in it
    bytes: int
    connectivity: int
    built: str
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def state(index) -> AnnState | None:
    """The index's ANN row (None when it has none or the row is unreadable)."""
    with index._db():
        row = index.conn.execute("SELECT value FROM info WHERE key = ?", (INFO_KEY,)).fetchone()
    if row is None:
        return None
    try:
        st = AnnState(**json.loads(row[0]))
    except (ValueError, TypeError):
        log.warning(
            "index %s: its ANN record is unreadable; searching exactly until it is rebuilt", index.root
        )
        return None
    return st if FILE_RE.match(st.file) else None


def _tail_count(index, max_id: int) -> int:
    with index._db():
        return index.conn.execute("SELECT COUNT(*) FROM cases WHERE id > ?", (max_id,)).fetchone()[0]


def ensure(index, *, min_cases: int | None = None, dtype: str | None = None, threads: int | None = None):
    """Build the ANN when the index has reached the threshold and has none (or a damaged one),
    or rebuild it when the cases added since exceed :data:`TAIL_FRACTION` of it; else nothing.
    Returns the state in force afterwards (None: below the threshold)."""
    floor = index.ann_min_cases if min_cases is None else min_cases
    st = state(index)
    if st is not None and _open_view(index, st) is not None:
        if _tail_count(index, st.max_id) <= max(TAIL_MIN, TAIL_FRACTION * st.cases):
            return st
    elif index.count() < floor:
        return None
    return build(index, dtype=dtype or (st.dtype if st else DEFAULT_DTYPE), threads=threads)


def build(
    index,
    *,
    dtype: str = DEFAULT_DTYPE,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> AnnState:
    """Build the HNSW graph over every case now in the index and put it in force atomically.

    Reads the float32 vectors from SQLite in chunks (the graph holds its own int8/f16 copy;
    no float32 matrix of the whole index is made). ``progress(done, total)`` after each chunk.
    """
    from usearch.index import Index

    if dtype not in DTYPES:
        from edge.errors import UsageError

        raise UsageError(f"ANN vectors are one of {', '.join(DTYPES)} (got {dtype!r})")
    t0 = time.perf_counter()
    root: Path = index.root
    total = index.count()
    graph = Index(
        ndim=index.dim,
        metric="cos",
        dtype=dtype,
        connectivity=CONNECTIVITY,
        expansion_add=EXPANSION_ADD,
        expansion_search=EXPANSION_SEARCH,
    )
    last, done = 0, 0
    while True:  # ids only grow and commits are serialized: each chunk sees a consistent prefix
        with index._db():
            rows = index.conn.execute(
                "SELECT id, embedding FROM cases WHERE id > ? ORDER BY id LIMIT ?", (last, CHUNK)
            ).fetchall()
        if not rows:
            break
        ids = np.fromiter((r[0] for r in rows), dtype=np.uint64, count=len(rows))
        mat = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), index.dim)
        graph.add(ids, mat, threads=threads or os.cpu_count() or 1)
        last, done = int(ids[-1]), done + len(rows)
        if progress:
            progress(done, max(total, done))
    tmp = root / f".ann.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    name = f"ann-{last}-{secrets.token_hex(4)}.usearch"
    try:
        from edge.bundle.atomic import reporting_disk_full

        with reporting_disk_full(root, f"building the ANN index of {root}"):
            graph.save(str(tmp))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        del graph
        st = AnnState(
            file=name,
            dtype=dtype,
            cases=done,
            max_id=last,
            bytes=tmp.stat().st_size,
            connectivity=CONNECTIVITY,
            built=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            seconds=round(time.perf_counter() - t0, 3),
        )
        _commit(index, tmp, st)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    log.info("index: ANN (%s) over %d cases built in %.1fs, %d MiB", dtype, done, st.seconds, st.bytes >> 20)
    return st


def _commit(index, tmp: Path, st: AnnState) -> None:
    """Rename the new file into place and name it in the info row, under the write lock; then
    remove the previous file and any litter (no other builder can commit meanwhile)."""
    root = index.root
    with index._db():
        cur = index.conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            os.replace(tmp, root / st.file)
            _fsync_dir(root)
            cur.execute(
                "INSERT OR REPLACE INTO info(key, value) VALUES (?, ?)", (INFO_KEY, json.dumps(st.to_json()))
            )
            cur.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                cur.execute("ROLLBACK")
            with contextlib.suppress(FileNotFoundError):
                (root / st.file).unlink()
            raise
    sweep(root, keep=st.file)


def sweep(root: Path, *, keep: str | None) -> list[str]:
    """Remove ANN files other than ``keep`` and temp files of builders that are gone."""
    removed = []
    for p in Path(root).iterdir():
        stale = FILE_RE.match(p.name) and p.name != keep
        if (m := _TMP_RE.match(p.name)) and not pid_alive(int(m.group(1))):
            stale = True
        if stale:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p.name)
    if removed:
        log.info("index %s: removed %d stale ANN files", root, len(removed))
    return removed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_view(index, st: AnnState):
    """The memory-mapped graph named by ``st`` (cached on the index), or None when its file is
    missing or not what the row says (logged; search is exact until the next build)."""
    cached = getattr(index, "_ann_view", None)
    if cached is not None and cached[0] == st.file:
        return cached[1]
    from usearch.index import Index

    path = index.root / st.file
    try:
        size = path.stat().st_size
        meta = Index.metadata(str(path)) if size == st.bytes else None
        if not meta or int(meta.get("dimensions", -1)) != index.dim:
            raise ValueError(f"{size} bytes, {meta}")
        graph = Index.restore(str(path), view=True, expansion_search=EXPANSION_SEARCH)
    except (OSError, ValueError, RuntimeError) as exc:
        log.warning(
            "index %s: ANN file %s is missing or damaged (%s); searching exactly until it is rebuilt "
            "(the next `index add` or `index import-archive` rebuilds it)",
            *(index.root, st.file, str(exc).splitlines()[0] if str(exc) else type(exc).__name__),
        )
        return None
    index._ann_view = (st.file, graph)
    return graph


def vectors(index, ids) -> tuple[np.ndarray, np.ndarray]:
    """The stored float32 vectors of ``ids`` in that order (those that exist): (ids [n], [n, D])."""
    ids = [int(i) for i in ids]
    found: dict[int, bytes] = {}
    with index._db():
        for i in range(0, len(ids), 900):
            part = ids[i : i + 900]
            found.update(
                index.conn.execute(
                    f"SELECT id, embedding FROM cases WHERE id IN ({','.join('?' * len(part))})", part
                )
            )
    got = [i for i in ids if i in found]
    mat = np.frombuffer(b"".join(found[i] for i in got), dtype="<f4").reshape(len(got), index.dim)
    return np.asarray(got, dtype=np.int64), mat


def _allowed(index, ids, where: dict[str, str]) -> list[int]:
    """Those of ``ids`` whose metadata matches every ``where`` pair (one SQL query per 900)."""
    ids = [int(i) for i in ids]
    if not where:
        return ids
    out: list[int] = []
    conds = " AND ".join(
        "EXISTS (SELECT 1 FROM case_meta m WHERE m.case_id = c.id AND m.key = ? AND m.value = ?)"
        for _ in where
    )
    pairs = [x for kv in where.items() for x in kv]
    with index._db():
        for i in range(0, len(ids), 900):
            part = ids[i : i + 900]
            sql = f"SELECT c.id FROM cases c WHERE c.id IN ({','.join('?' * len(part))}) AND {conds}"
            out += [r[0] for r in index.conn.execute(sql, part + pairs)]
    return out


def _exact_ids(index, q: np.ndarray, k: int, *, sql: str, args: list) -> list[tuple[int, float]]:
    """Exact top-k over the cases ``sql`` selects (``SELECT id, embedding ...``), in chunks."""
    best: list[tuple[int, float]] = []
    with index._db():
        cur = index.conn.execute(sql, args)
        while rows := cur.fetchmany(CHUNK):
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            mat = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), index.dim)
            s = mat @ q
            top = np.argpartition(-s, min(k, len(s)) - 1)[:k]
            best = sorted(best + [(int(ids[i]), float(s[i])) for i in top], key=lambda t: -t[1])[:k]
    return best


def _filter_sql(where: dict[str, str]) -> tuple[str, list]:
    conds = "".join(
        " AND EXISTS (SELECT 1 FROM case_meta m WHERE m.case_id = c.id AND m.key = ? AND m.value = ?)"
        for _ in where
    )
    return conds, [x for kv in where.items() for x in kv]


def search(index, q: np.ndarray, k: int, where: dict[str, str] | None) -> list[tuple[int, float]] | None:
    """Top-``k`` ``(id, exact cosine)`` through the ANN, or None when the index should be
    searched exactly (below the threshold, or no usable graph). ``q`` is L2-normalized."""
    st = state(index)
    if st is None or st.cases < index.ann_min_cases:
        return None
    graph = _open_view(index, st)
    if graph is None:
        return None
    t0 = time.perf_counter()
    where = where or {}
    want = max(CANDIDATES, 2 * k)
    count = want if not where else 4 * want
    while True:
        count = min(count, st.cases)
        graph.expansion_search = max(EXPANSION_SEARCH, count)
        keys = graph.search(q, count).keys
        allowed = _allowed(index, keys, where)
        if len(allowed) >= want or count >= st.cases or not where:
            break
        if count * 4 > MAX_CANDIDATES:  # a narrow filter: score its subset exactly
            conds, args = _filter_sql(where)
            hits = _exact_ids(
                index, q, k, sql=f"SELECT c.id, c.embedding FROM cases c WHERE 1{conds}", args=args
            )
            log.info("index: filtered search scored its subset exactly in %.1f ms", _ms(t0))
            return hits
        count *= 4
    ids, mat = vectors(index, allowed)
    scored = list(zip(ids.tolist(), (mat @ q).tolist(), strict=True))
    conds, args = _filter_sql(where)
    scored += _exact_ids(  # cases added since the graph was built
        index,
        q,
        k,
        sql=f"SELECT c.id, c.embedding FROM cases c WHERE c.id > ?{conds}",
        args=[st.max_id, *args],
    )
    scored.sort(key=lambda t: (-t[1], t[0]))
    log.info(
        "index: ANN searched %d cases (%d candidates re-ranked) in %.1f ms", st.cases, len(scored), _ms(t0)
    )
    return scored[:k]


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3
