"""Move a similar-case index between devices: one ``.tar`` with a manifest, ids and metadata kept.

```
INDEX.tar
  manifest.json     {"format": "medgemma-edge-cases-export/1", "fingerprint", "precision", "cases",
                     "max_id", "created", "files": {"cases.sqlite": {"bytes", "sha256"}, ...}}
  cases.sqlite      a consistent snapshot (SQLite ``VACUUM INTO``: safe while another process adds)
  files/ab/<sha256><ext>   the index's own image copies, if it has any
```

Export writes the archive through a temp file and renames it into place. Import checks the
manifest, every member's hash, the database's integrity and (given one) the encoder fingerprint
in a staging directory beside the target, and only then renames it into place: a failed import
leaves nothing behind. Only the members listed above are extracted (no paths from the archive
are trusted). Cases added by reference (no copy) keep their original source paths, which name
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
from edge.cases.index import DB_NAME, FILES_DIR, CaseIndex, connect
from edge.errors import InputError, UsageError

log = logging.getLogger(__name__)

EXPORT_FORMAT = "medgemma-edge-cases-export/1"
MANIFEST = "manifest.json"
_MEMBER = re.compile(
    rf"^(?:{re.escape(DB_NAME)}|{FILES_DIR}/[0-9a-f]{{2}}/[0-9a-f]{{64}}(?:\.[A-Za-z0-9]{{1,7}})?)$"
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
            with idx._lock:
                idx.conn.execute("VACUUM INTO ?", (str(snap),))
            with contextlib.closing(sqlite3.connect(snap)) as c:
                cases, max_id = c.execute("SELECT COUNT(*), COALESCE(MAX(id), 0) FROM cases").fetchone()
                stored = [r[0] for r in c.execute("SELECT stored FROM cases WHERE stored IS NOT NULL")]
            members = {DB_NAME: snap} | {rel: root / rel for rel in stored}
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


def import_index(
    archive: str | os.PathLike, root: str | os.PathLike, *, fingerprint: str | None = None
) -> dict:
    """Unpack ``archive`` into a new index at ``root`` (absent or an empty folder).

    Args:
        fingerprint: the encoder fingerprint this device will search with; a different one in
            the archive is refused.
    Raises:
        UsageError: ``root`` already holds something.
        InputError: not an index export, a damaged member, another encoder's index.
    """
    archive, root = Path(archive), Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UsageError(f"{root} is not empty; import into a new index directory")
    if not archive.is_file():
        raise InputError(f"{archive} does not exist")
    root.parent.mkdir(parents=True, exist_ok=True)
    stage = root.with_name(f".{root.name}.import-{os.getpid()}-{secrets.token_hex(4)}")
    stage.mkdir()
    try:
        try:
            tar = tarfile.open(archive, "r:*")
        except (tarfile.TarError, OSError) as exc:
            raise InputError(f"{archive} is not an index export ({exc})") from None
        with tar:
            manifest = _read_manifest(tar, archive)
            if fingerprint is not None and manifest["fingerprint"] != fingerprint:
                raise InputError(
                    f"{archive} holds an index built with another MedSigLIP encoder (fingerprint "
                    f"{manifest['fingerprint']}, {manifest.get('precision')}); this bundle's is {fingerprint}"
                )
            for rel, want in manifest["files"].items():
                if not _MEMBER.match(rel):
                    raise InputError(f"{archive}: unexpected member {rel!r} in the manifest")
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
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info("index import: %d cases", manifest["cases"])
    return manifest


def _read_manifest(tar: tarfile.TarFile, archive: Path) -> dict:
    try:
        member = tar.getmember(MANIFEST)
        f = tar.extractfile(member)
        manifest = json.loads(f.read()) if f else None
    except (KeyError, ValueError, tarfile.TarError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise InputError(f"{archive} is not a medgemma-edge index export (no valid {MANIFEST})")
    if DB_NAME not in manifest.get("files", {}):
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
    with open(dst, "wb") as out:
        while chunk := src.read(1 << 20):
            h.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if h.hexdigest() != want.get("sha256") or dst.stat().st_size != want.get("bytes"):
        raise InputError(f"{archive}: {rel} does not match its manifest hash (damaged in transit?)")
