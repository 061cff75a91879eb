"""Atomic replacement on disk: JSON files, and whole directories swapped into place.

A directory is replaced by building the new one beside it and exchanging the two with
``renameat2(RENAME_EXCHANGE)``. Where the kernel or filesystem lacks that, the old directory is
first renamed aside to ``.NAME.previous-*`` and the new one renamed in; a crash between those
two renames leaves no directory at the target, and :func:`recover_interrupted_swap` (which
:func:`edge.bundle.manifest.open_bundle` runs) puts the old one back. Both sides live here so
that the side name is written once.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temp file + fsync + rename: readers see old or new, whole."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``, so a swap never publishes unwritten data."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _previous_name(root: Path) -> str:
    """Prefix of the side name the old directory takes during a two-rename swap."""
    return f".{root.name}.previous-"


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE). False when unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_into_place(staging: Path, root: Path) -> None:
    """Make ``staging`` the directory at ``root`` and delete what was there, atomically."""
    if not root.exists():
        os.rename(staging, root)
        return
    if _exchange(staging, root):
        shutil.rmtree(staging)  # now holds the previous directory
        return
    prev = root.with_name(f"{_previous_name(root)}{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(root, prev)  # a crash here is repaired by recover_interrupted_swap
    os.rename(staging, root)
    shutil.rmtree(prev)


def recover_interrupted_swap(root: Path, *, marker: str) -> None:
    """If an interrupted swap left the old directory under its side name, put it back.

    Args:
        marker: a file the directory must hold to be restored (a bundle's ``manifest.json``).
    """
    if root.exists():
        return
    for prev in sorted(root.parent.glob(f"{_previous_name(root)}*")):
        if (prev / marker).is_file():
            log.warning("restoring bundle %s from interrupted update %s", root, prev.name)
            os.rename(prev, root)
            return
