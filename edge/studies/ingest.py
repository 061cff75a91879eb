"""Folder import into the study store: a USB stick from a CR reader, a CD, a folder of exports.

:func:`import_folder` walks the folder (:func:`edge.files.walk_files`: regular files only,
hidden names and linked folders left out), peeks at each file's first 132 bytes for the
``DICM`` marker, reads the DICOM ones bounded (:func:`edge.files.read_bytes`) and stores them
through :meth:`edge.studies.store.StudyStore.add_bytes`; everything else is skipped with a
one-line reason. A full disk stops the import (what was stored stays).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from edge.errors import InputError
from edge.files import FileMissing, format_bytes, read_bytes, walk_files
from edge.studies.instance import is_part10

if TYPE_CHECKING:
    from edge.studies.store import StudyStore

log = logging.getLogger(__name__)


def import_folder(
    store: StudyStore, directory: str | os.PathLike, *, progress: Callable[[int, int], None] | None = None
) -> dict:
    """See :meth:`edge.studies.store.StudyStore.import_folder`."""
    from edge.studies.store import MAX_INSTANCE_BYTES

    root = Path(directory)
    if not root.exists():
        raise FileMissing(f"folder {root} does not exist")
    if not root.is_dir():
        raise InputError(f"{root} is not a folder; give the folder that holds the DICOM files")
    t0 = time.perf_counter()
    skipped_raw: list[tuple[str, str]] = []
    files = list(walk_files(root, skipped=skipped_raw))
    rel = lambda p: os.path.relpath(p, root)  # noqa: E731
    skipped = [[rel(p), why] for p, why in skipped_raw]
    out = {"files": len(files), "stored": 0, "duplicates": 0, "skipped": skipped, "bytes": 0}
    for i, path in enumerate(files):
        name = rel(path)
        why = None
        try:
            with open(path, "rb") as f:
                head = f.read(132)
            if not is_part10(head):
                why = "not a DICOM file (no DICM marker at byte 128)"
            elif os.path.getsize(path) > MAX_INSTANCE_BYTES:
                why = f"over the {format_bytes(MAX_INSTANCE_BYTES)} instance limit"
            else:
                data = read_bytes(path, limit=MAX_INSTANCE_BYTES, what="DICOM file")
                got = store.add_bytes(data, source="import", name=name)
                out["stored" if got.status == "stored" else "duplicates"] += 1
                out["bytes"] += got.bytes if got.status == "stored" else 0
        except OSError as exc:
            why = f"can't read it ({exc.strerror or exc})"
        except InputError as exc:  # a ResourceError (disk full) stops the import
            msg = str(exc)
            why = msg[len(name) :].lstrip(": ") if msg.startswith(name) else msg
        if why:
            skipped.append([name, why])
        if progress:
            progress(i + 1, len(files))
    out["seconds"] = round(time.perf_counter() - t0, 3)
    log.info(
        "studies: import of %d files: %d stored, %d duplicates, %d skipped in %.2fs",
        len(files),
        out["stored"],
        out["duplicates"],
        len(skipped),
        out["seconds"],
    )
    return out
