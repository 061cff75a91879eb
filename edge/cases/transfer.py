"""Move a similar-case index between devices: one ``.tar`` with a manifest, ids and metadata kept.

```
INDEX.tar
  manifest.json     {"format": "medgemma-edge-cases-export/1", "fingerprint", "precision", "cases",
                     "max_id", "created", "files": {"cases.sqlite": {"bytes", "sha256"}, ...}}
  cases.sqlite      a consistent snapshot (SQLite ``VACUUM INTO``: safe while another process adds)
  files/ab/<sha256><ext>   the index's own image copies, if it has any
  ann-<id>-<token>.usearch the ANN graph named by the snapshot's ``ann`` info row (large indexes)
```

Export writes the archive through a temp file and renames it into place. Import checks the
manifest, every member's hash, the database's integrity and (given one) the encoder fingerprint
in a staging directory beside the target, and only then renames it into place: a failed import
leaves nothing behind. Only the members listed above are extracted (no paths from the archive
are trusted); an archive with any member that is not a regular file or a folder (a link, a
device, a FIFO) is refused, and each member is bounded (``manifest.json`` 8 MiB, image copies the
image limit, ``cases.sqlite`` :data:`MAX_DB_BYTES`) and must fit on the disk before extraction. Cases added by reference (no copy) keep their original source paths, which name
files on the exporting device.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import tarfile
import time
from pathlib import Path

from edge.bundle.manifest import sha256_file
from edge.cases import ann
from edge.cases.index import DB_NAME, FILES_DIR, CaseIndex, connect
from edge.errors import InputError, ResourceError, TooLargeError, UsageError
from edge.files import MAX_JSON_BYTES, check_regular, format_bytes
from edge.media.images import MAX_FILE_BYTES

log = logging.getLogger(__name__)

EXPORT_FORMAT = "medgemma-edge-cases-export/1"
MANIFEST = "manifest.json"
# the largest cases.sqlite an archive may hold (image copies: the image limit, MAX_FILE_BYTES;
# manifest.json: MAX_JSON_BYTES, 8 MiB)
MAX_DB_BYTES = int(os.environ.get("MEDGEMMA_EDGE_MAX_INDEX_DB_BYTES", 32 << 30))
_KINDS = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
}
_MEMBER = re.compile(
    rf"^(?:{re.escape(DB_NAME)}|{FILES_DIR}/[0-9a-f]{{2}}/[0-9a-f]{{64}}(?:\.[A-Za-z0-9]{{1,7}})?"
    rf"|{ann.FILE_RE.pattern[1:-1]})$"
)


def export_index(root: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write the index at ``root`` to the archive ``out`` (refuses to overwrite). Returns the manifest."""
    root, out = Path(root), Path(out)
    if out.exists():
        raise UsageError(f"{out} exists; choose a new file name (nothing is overwritten)")
    t0 = time.perf_counter()
    with CaseIndex.open(root) as idx:
        stage = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        stage.mkdir(parents=True)
        try:
            snap = stage / DB_NAME
            graph = _snapshot(idx, snap, stage)
            with contextlib.closing(sqlite3.connect(snap)) as c:
                cases, max_id = c.execute("SELECT COUNT(*), COALESCE(MAX(id), 0) FROM cases").fetchone()
                stored = [r[0] for r in c.execute("SELECT stored FROM cases WHERE stored IS NOT NULL")]
            members = {DB_NAME: snap} | {rel: root / rel for rel in stored}
            if graph is not None:
                members[graph.name] = graph
            manifest = {
                "format": EXPORT_FORMAT,
                "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "fingerprint": idx.fingerprint,
                "precision": idx.info.get("precision"),
                "model": idx.info.get("model"),
                "dim": idx.dim,
                "cases": cases,
                "max_id": max_id,
                "files": {
                    rel: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for rel, p in members.items()
                },
            }
            tmp_tar = stage / "out.tar"
            with tarfile.open(tmp_tar, "w") as tar:
                data = json.dumps(manifest, indent=2).encode()
                ti = tarfile.TarInfo(MANIFEST)
                ti.size, ti.mtime = len(data), int(time.time())
                tar.addfile(ti, io.BytesIO(data))
                for rel, p in members.items():
                    tar.add(p, arcname=rel, recursive=False)
            with open(tmp_tar, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp_tar, out)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    log.info("index export: %d cases, %d files in %.2fs", cases, len(members), time.perf_counter() - t0)
    return manifest


def _snapshot(idx: CaseIndex, snap: Path, stage: Path) -> Path | None:
    """``VACUUM INTO`` ``snap`` and a copy of the ANN file its ``ann`` row names (in ``stage``).

    The ANN file is opened before the snapshot: a build that replaces it meanwhile may unlink
    it, but the open file stays readable; if the snapshot names a newer file, try again. A
    snapshot whose file can't be had loses its ``ann`` row (the importer rebuilds it)."""
    for _ in range(3):
        st = ann.state(idx)
        src = None
        if st is not None:
            with contextlib.suppress(FileNotFoundError):
                src = open(idx.root / st.file, "rb")  # noqa: SIM115 (closed below)
        try:
            with contextlib.suppress(FileNotFoundError):
                snap.unlink()
            with idx._lock:
                idx.conn.execute("VACUUM INTO ?", (str(snap),))
            with contextlib.closing(sqlite3.connect(snap)) as c:
                row = c.execute("SELECT value FROM info WHERE key = ?", (ann.INFO_KEY,)).fetchone()
                named = json.loads(row[0]).get("file") if row else None
                if named is None:
                    return None
                if src is not None and named == st.file:
                    dst = stage / st.file
                    with open(dst, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                        out.flush()
                        os.fsync(out.fileno())
                    return dst
        finally:
            if src is not None:
                src.close()
    with contextlib.closing(sqlite3.connect(snap)) as c:
        c.execute("DELETE FROM info WHERE key = ?", (ann.INFO_KEY,))
        c.commit()
    log.warning("index export: the ANN file kept changing; exported without it (the importer rebuilds it)")
    return None


def import_index(
    archive: str | os.PathLike, root: str | os.PathLike, *, fingerprint: str | None = None
) -> dict:
    """Unpack ``archive`` into a new index at ``root`` (absent or an empty folder).

    Args:
        fingerprint: the encoder fingerprint this device will search with; a different one in
            the archive is refused.
    Raises:
        UsageError: ``root`` already holds something.
        InputError: not an index export (or not a regular file), a damaged member, a member
            that is a link or a device, another encoder's index.
        TooLargeError: a member over its size limit.
        ResourceError: the members don't fit on the disk.
    """
    archive, root = Path(archive), Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UsageError(f"{root} is not empty; import into a new index directory")
    check_regular(archive, "index archive")  # a FIFO or a device is refused, not read
    root.parent.mkdir(parents=True, exist_ok=True)
    stage = root.with_name(f".{root.name}.import-{os.getpid()}-{secrets.token_hex(4)}")
    stage.mkdir()
    try:
        try:
            tar = tarfile.open(archive, "r:*")
        except tarfile.ReadError:
            raise InputError(f"{archive} is not an index export (not a tar archive)") from None
        except (tarfile.TarError, OSError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
            raise InputError(f"{archive} is not an index export ({reason})") from None
        with tar:
            _check_members(tar, archive)
            manifest = _read_manifest(tar, archive)
            if fingerprint is not None and manifest["fingerprint"] != fingerprint:
                raise InputError(
                    f"{archive} holds an index built with another MedSigLIP encoder (fingerprint "
                    f"{manifest['fingerprint']}, {manifest.get('precision')}); this bundle's is {fingerprint}"
                )
            for rel in manifest["files"]:
                if not _MEMBER.match(rel):
                    raise InputError(f"{archive}: unexpected member {rel!r} in the manifest")
            _check_space(tar, manifest, stage, archive)
            for rel, want in manifest["files"].items():
                _extract(tar, rel, stage / rel, want, archive)
        with contextlib.closing(connect(stage / DB_NAME)) as c:
            ok = c.execute("PRAGMA integrity_check").fetchone()[0]
            cases = c.execute("SELECT COUNT(*) FROM cases").fetchone()[0]
        if ok != "ok" or cases != manifest["cases"]:
            raise InputError(f"{archive}: the database is damaged ({ok}, {cases} cases); export it again")
        CaseIndex.open(stage, fingerprint=fingerprint).close()
        if root.exists():
            root.rmdir()
        os.rename(stage, root)
        with CaseIndex.open(root) as idx:
            ann.ensure(idx)  # an archive without its ANN (or from an older runtime) gets one here
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info("index import: %d cases", manifest["cases"])
    return manifest


def _check_members(tar: tarfile.TarFile, archive: Path) -> None:
    """Refuse an archive with a member that is not a regular file or a folder (a symbolic or
    hard link, a device, a FIFO): an export never writes one."""
    for m in tar.getmembers():
        if not (m.isfile() or m.isdir()):
            kind = _KINDS.get(m.type, f"type {m.type!r}")
            raise InputError(
                f"{archive}: member {m.name!r} is {kind}, not a regular file; this is not an index export"
            )


def _check_space(tar: tarfile.TarFile, manifest: dict, stage: Path, archive: Path) -> None:
    """Each listed member within its size limit and its manifest size, and room for them all."""
    total = 0
    for rel, want in manifest["files"].items():
        try:
            member = tar.getmember(rel)
        except KeyError:
            raise InputError(f"{archive}: {rel} is missing; export the index again") from None
        limit = MAX_DB_BYTES if rel == DB_NAME or ann.FILE_RE.match(rel) else MAX_FILE_BYTES
        if member.size > limit:
            raise TooLargeError(
                f"{archive}: {rel} is {format_bytes(member.size)}, over the {format_bytes(limit)} limit"
            )
        if not isinstance(want, dict) or member.size != want.get("bytes"):
            raise InputError(f"{archive}: {rel} does not match its manifest size (damaged in transit?)")
        total += member.size
    free = shutil.disk_usage(stage).free
    if total > free:
        raise ResourceError(
            f"importing {archive} needs {format_bytes(total)} on the disk of {stage.parent}, "
            f"which has {format_bytes(free)} free"
        )


def archive_manifest(archive: str | os.PathLike) -> dict:
    """The manifest of an index export archive (bounded read; the archive must be a regular file).

    Raises:
        InputError: not a regular file, not a tar archive, or not a medgemma-edge index export.
    """
    archive = Path(archive)
    check_regular(archive, "index archive")
    try:
        with tarfile.open(archive) as tar:
            return _read_manifest(tar, archive)
    except tarfile.TarError:
        raise InputError(f"{archive} is not a tar archive (an index export)") from None


def _read_manifest(tar: tarfile.TarFile, archive: Path) -> dict:
    try:
        member = tar.getmember(MANIFEST)
        if not member.isfile() or member.size > MAX_JSON_BYTES:
            raise ValueError(f"{MANIFEST} is not a regular file of at most {format_bytes(MAX_JSON_BYTES)}")
        f = tar.extractfile(member)
        manifest = json.loads(f.read(MAX_JSON_BYTES + 1)) if f else None
    except (KeyError, ValueError, RecursionError, tarfile.TarError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise InputError(f"{archive} is not a medgemma-edge index export (no valid {MANIFEST})")
    if not isinstance(manifest.get("files"), dict) or DB_NAME not in manifest["files"]:
        raise InputError(f"{archive}: the manifest lists no {DB_NAME}")
    return manifest


def _extract(tar: tarfile.TarFile, rel: str, dst: Path, want: dict, archive: Path) -> None:
    try:
        member = tar.getmember(rel)
    except KeyError:
        raise InputError(f"{archive}: {rel} is missing; export the index again") from None
    if not member.isfile():
        raise InputError(f"{archive}: {rel} is not a regular file")
    dst.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    src = tar.extractfile(member)
    written = 0
    with open(dst, "wb") as out:
        while written <= member.size and (chunk := src.read(1 << 20)):  # never past the member's size
            h.update(chunk)
            out.write(chunk)
            written += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    if h.hexdigest() != want.get("sha256") or written != want.get("bytes"):
        raise InputError(f"{archive}: {rel} does not match its manifest hash (damaged in transit?)")
