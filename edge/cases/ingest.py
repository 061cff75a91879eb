"""Adding images to a similar-case index: find files, skip what is there, embed, write per batch.

:func:`add_files` (what :meth:`edge.cases.CaseIndex.add` runs) reads each file once: its sha256
decides whether it is already indexed (then it is not even decoded); otherwise it is decoded by
:func:`edge.media.images.load_image` (PNG/JPEG/DICOM, the runtime's size limits) and preprocessed. A
file that is not a readable image is reported and skipped. Every ``batch_size`` images the batch
is embedded, copied into the index if asked (temp file + fsync + rename), then written in one
transaction (:meth:`edge.cases.CaseIndex.insert_batch`). A crash or kill loses at most the batch
in flight; running the same add again skips what was committed and adds the rest.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.cases.index import FILES_DIR, CaseIndex
from edge.errors import Cancelled, EdgeError, InputError, UsageError
from edge.files import check_regular, read_bytes, walk_files
from edge.media.images import MAX_FILE_BYTES, load_image

log = logging.getLogger(__name__)

BATCH = 16  # images per transaction


@dataclass
class AddReport:
    """What one :func:`add_files` did."""

    files: int = 0  # files found
    added: int = 0
    duplicates: int = 0  # already in the index (or twice in this run)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, one-line reason)
    seconds: float = 0.0
    embed_seconds: float = 0.0
    total: int = 0  # cases in the index afterwards

    @property
    def images_per_s(self) -> float:
        return self.added / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict:
        return {
            **{k: v for k, v in vars(self).items() if k != "failed"},
            "failed": [{"path": p, "error": e} for p, e in self.failed],
            "images_per_s": self.images_per_s,
        }


def iter_files(
    sources: Iterable[str | os.PathLike], *, skipped: list[tuple[str, str]] | None = None
) -> Iterator[Path]:
    """Files given, and every regular file under the folders given (recursive, sorted; hidden
    ones skipped). Entries of a folder that are not regular files (devices, FIFOs, sockets,
    broken links) are left out and appended to ``skipped`` as ``(path, reason)``.

    Raises:
        InputError: a path given does not exist, or is itself not a regular file or a folder.
    """
    for src in sources:
        p = Path(src)
        if p.is_dir():
            yield from walk_files(p, skipped=skipped)
        elif not os.path.lexists(p):
            raise InputError(f"{p} does not exist (give image files or folders)")
        else:
            check_regular(p, "image")  # a FIFO, a device, a socket given by name: refused
            yield p


def add_files(
    index: CaseIndex,
    sources: Iterable[str | os.PathLike],
    *,
    encoder,
    meta: dict[str, str] | None = None,
    copy: bool = False,
    batch_size: int = BATCH,
    cancel: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_added: Callable[[int], None] | None = None,
) -> AddReport:
    """Index image files and folders (recursive); one transaction per batch.

    Args:
        index: the open index.
        encoder: the :class:`edge.medsiglip.model.MedSigLIP` the index is bound to.
        meta: key/value metadata stored with every case added here (beside the automatic
            ``format`` and, for DICOM, ``modality``).
        copy: keep a copy of each image in the index (else only its source path).
        batch_size: images per transaction.
        cancel: set it to stop before the next file (:class:`Cancelled`; committed batches stay).
        progress: ``progress(files done, files total)``, after each file.
        on_added: ``on_added(n)`` as each case is inserted, ``n`` counting the cases this call
            has added so far. It runs inside the batch's transaction, before the commit: use it
            for a live count, or to abort (what it raises rolls the whole batch back).
    Raises:
        InputError: a path given does not exist, or the encoder is not the index's.
        Cancelled: ``cancel`` was set.
    """
    if encoder.fingerprint != index.fingerprint:
        raise InputError(
            f"index {index.root} is bound to encoder {index.fingerprint}, not {encoder.fingerprint}"
        )
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1 (got {batch_size})")
    meta = dict(meta or {})
    t0 = time.perf_counter()
    skipped: list[tuple[str, str]] = []
    files = list(iter_files(sources, skipped=skipped))
    rep = AddReport(files=len(files) + len(skipped), failed=skipped)
    seen: set[str] = set()
    pending: list[dict] = []
    for i, path in enumerate(files):
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"cancelled after {rep.added} images; re-run the same add to resume")
        row = _prepare(index, path, encoder, seen, rep)
        if row is not None:
            pending.append(row)
        if len(pending) >= batch_size:
            _write_batch(index, pending, encoder, meta, copy, rep, on_added)
            pending = []
        if progress:
            progress(i + 1, len(files))
    if pending:
        _write_batch(index, pending, encoder, meta, copy, rep, on_added)
    rep.seconds = time.perf_counter() - t0
    rep.total = index.count()
    log.info(
        "index add: %d files, %d added, %d duplicates, %d failed in %.1fs (embed %.1fs)",
        *(rep.files, rep.added, rep.duplicates, len(rep.failed), rep.seconds, rep.embed_seconds),
    )
    return rep


def _prepare(index: CaseIndex, path: Path, encoder, seen: set[str], rep: AddReport) -> dict | None:
    """Read, hash, skip duplicates, decode and preprocess one file; None when skipped."""
    try:
        data = read_bytes(path, limit=MAX_FILE_BYTES, what="image")  # regular files only, bounded
    except InputError as exc:  # gone, unreadable, not a regular file any more, over the limit
        rep.failed.append((str(path), str(exc)))
        return None
    digest = hashlib.sha256(data).hexdigest()
    if digest in seen or index.has(digest):
        rep.duplicates += 1
        return None
    try:
        loaded = load_image(data)
        pixels = encoder.pixels(loaded)  # [3, H, W]: the decoded picture is not kept
    except Cancelled:
        raise
    except EdgeError as exc:  # not an image, corrupt, too large, DICOM without a decoder
        msg = str(exc)  # load_image calls bytes "image": name the file instead
        rep.failed.append((str(path), path.name + msg[5:] if msg.startswith("image") else msg))
        return None
    seen.add(digest)
    facts = {"format": loaded.format}
    if loaded.info.get("modality"):
        facts["modality"] = loaded.info["modality"]
    return {
        "hash": digest,
        "source": str(path.resolve()),
        "suffix": path.suffix.lower()[:8] if path.suffix else "",
        "format": loaded.format,
        "size": loaded.source_size,
        "pixels": pixels,
        "facts": facts,
    }


def _copy_in(root: Path, src: str, digest: str, suffix: str) -> str:
    """Copy a file into files/ through a temp name + fsync + rename; returns its relative path.

    The source is read again through :func:`edge.files.read_bytes` (regular files only, bounded)
    and must still hash to ``digest``: a file replaced since it was embedded is not stored.
    """
    rel = f"{FILES_DIR}/{digest[:2]}/{digest}{suffix}"
    dst = root / rel
    if not dst.exists():
        data = read_bytes(src, limit=MAX_FILE_BYTES, what="image")
        if hashlib.sha256(data).hexdigest() != digest:
            raise InputError(f"image {src} changed while it was being indexed; run the same add again")
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    return rel


def _write_batch(
    index: CaseIndex,
    rows: list[dict],
    encoder,
    meta: dict,
    copy: bool,
    rep: AddReport,
    on_added: Callable[[int], None] | None,
) -> None:
    """Embed one batch, copy its files in (if asked), then insert it in one transaction."""
    t0 = time.perf_counter()
    emb = encoder.embed_pixels(np.stack([r.pop("pixels") for r in rows]))  # [n, D]
    rep.embed_seconds += time.perf_counter() - t0
    for r in rows:  # copies first: a committed row always finds its copy
        r["stored"] = _copy_in(index.root, r["source"], r["hash"], r["suffix"]) if copy else None

    def on_row() -> None:
        rep.added += 1
        if on_added:
            on_added(rep.added)

    inserted = index.insert_batch(rows, emb, meta=meta, on_row=on_row)
    rep.duplicates += len(rows) - inserted  # another process indexed the same bytes meanwhile
