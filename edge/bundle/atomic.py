"""Atomic replacement on disk: JSON files, whole directories swapped into place, and their litter.

A directory is replaced by building the new one beside it and exchanging the two with
``renameat2(RENAME_EXCHANGE)``. Where the kernel or filesystem lacks that, the old directory is
first renamed aside to ``.NAME.previous-*`` and the new one renamed in; a crash between those
two renames leaves no directory at the target, and :func:`recover_interrupted_swap` (which
:func:`edge.bundle.manifest.open_bundle` runs) puts the old one back.

Everything a writer puts beside ``NAME`` while it works (``.NAME.staging-*``, ``.NAME.work-*``,
``.NAME.previous-*``) exists only while it holds the lock ``.NAME.lock`` (:func:`hold_lock`).
A writer killed at any point leaves it behind; the next writer, or the next reader that finds
the lock free, removes it (:func:`sweep_litter`). Both sides live here so that the names are
written once.

A full disk is reported as :class:`edge.errors.ResourceError` naming the disk
(:func:`disk_full_error`, :func:`reporting_disk_full`), never as a bare ``OSError``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import glob
import json
import logging
import os
import secrets
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edge.errors import ResourceError, UsageError

log = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_held = threading.local()  # .roots: {lock path: depth} this thread holds


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


# --- names beside the target -----------------------------------------------------------------------


def _previous_name(root: Path) -> str:
    """Prefix of the side name the old directory takes during a two-rename swap."""
    return f".{root.name}.previous-"


def staging_prefix(root: Path) -> str:
    """Prefix of the directory a writer builds the new ``root`` in."""
    return f".{root.name}.staging-"


def work_prefix(root: Path, what: str) -> str:
    """Prefix of a scratch directory beside ``root`` (``tempfile.mkdtemp(prefix=...)``), removed
    as litter when its writer died. Make it while holding :func:`hold_lock`."""
    return f".{root.name}.work-{what}-"


def lock_path(root: Path) -> Path:
    return root.parent / f".{root.name}.lock"


# --- the writer's lock -------------------------------------------------------------------------------


def _depths() -> dict[str, int]:
    if not hasattr(_held, "roots"):
        _held.roots = {}
    return _held.roots


@contextlib.contextmanager
def hold_lock(root: Path, *, busy: str | None = None) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``root`` (flock, released by the kernel if the process dies).

    Re-entrant in one thread: an export that holds it for its whole run can open a
    :class:`edge.bundle.write.BundleWriter` (which takes it again) inside.

    Raises:
        UsageError: another process or thread holds it (``busy``: the message).
    """
    import fcntl

    root = Path(root).absolute()
    lock = lock_path(root)
    key = str(lock)
    depths = _depths()
    if depths.get(key):
        depths[key] += 1
        try:
            yield
        finally:
            depths[key] -= 1
        return
    with open(lock, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(busy or f"another process is writing {root}; wait for it to finish") from None
        depths[key] = 1
        try:
            yield
        finally:
            del depths[key]


def holds_lock(root: Path) -> bool:
    """Whether this thread holds ``root``'s lock."""
    return bool(_depths().get(str(lock_path(Path(root).absolute()))))


def sweep_litter(root: Path) -> list[str]:
    """Remove what dead writers left beside ``root``: staging and work directories, and the old
    directory of a finished swap. Call only while holding the lock. Returns the names removed."""
    root = Path(root).absolute()
    pat = glob.escape(str(root.parent)) + os.sep + glob.escape(f".{root.name}.")
    found = glob.glob(pat + "staging-*") + glob.glob(pat + "work-*")
    if root.exists():  # else a previous-* may be the only copy: recover_interrupted_swap restores it
        found += glob.glob(pat + "previous-*")
    removed = []
    for p in sorted(found):
        log.warning("removing %s, left by an interrupted write of %s", os.path.basename(p), root)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(p)
        removed.append(os.path.basename(p))
    return removed


# --- the swap ---------------------------------------------------------------------------------------


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
    """Make ``staging`` the directory at ``root`` and delete what was there, atomically.

    A kill at any point leaves ``root`` as the complete old or the complete new directory (or,
    between the two renames of the fallback, none: :func:`recover_interrupted_swap` restores
    the old one); what is left beside it is removed by :func:`sweep_litter`.
    """
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
    """Repair what a writer killed mid-update left: put the old directory back if a swap was cut
    between its renames, then remove staging and scratch litter (:func:`sweep_litter`).

    Does nothing while another writer holds the lock (it is still working), and never sweeps
    litter this thread's own writer is using.

    Args:
        marker: a file the directory must hold to be restored (a bundle's ``manifest.json``).
    """
    root = Path(root)
    lock = lock_path(root.absolute())
    if not lock.exists():  # no writer ever ran here through the lock: only a restore to consider
        _restore(root, marker)
        return
    if holds_lock(root):
        return
    import fcntl

    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        _restore(root, marker)
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # a live writer: it finishes its own swap
        _restore(root, marker)
        with contextlib.suppress(OSError):
            sweep_litter(root)
    finally:
        os.close(fd)


def _restore(root: Path, marker: str) -> None:
    if root.exists():
        return
    for prev in sorted(root.parent.glob(f"{glob.escape(_previous_name(root))}*")):
        if (prev / marker).is_file():
            log.warning("restoring bundle %s from interrupted update %s", root, prev.name)
            try:
                os.rename(prev, root)
            except OSError as exc:  # read-only medium: the reader reports the missing bundle
                log.warning("could not restore %s: %s", root, exc)
            return


# --- a full disk -----------------------------------------------------------------------------------


def free_bytes(where: str | os.PathLike) -> int | None:
    """Free bytes on the filesystem holding ``where`` (its nearest existing ancestor); None if unknown."""
    probe = Path(where).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def is_disk_full(exc: BaseException, where: str | os.PathLike | None = None) -> bool:
    """Whether ``exc`` means the disk (or quota) is full: ENOSPC/EDQUOT, SQLite's SQLITE_FULL, or
    an errno-less write error (numpy's ``tofile``) while ``where``'s disk has under 1 MiB free."""
    import sqlite3

    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and code & 0xFF == sqlite3.SQLITE_FULL
    if not isinstance(exc, OSError):
        return False
    if exc.errno in _DISK_FULL:
        return True
    if exc.errno is None and where is not None:
        free = free_bytes(where)
        return free is not None and free < (1 << 20)
    return False


def disk_full_error(
    where: str | os.PathLike, what: str, *, need: int | None = None, kept: str | None = None
) -> ResourceError:
    """The one-line ResourceError for a full disk: names the directory, what was being written,
    how much is free (and, when known, about how much is needed), and what was kept as it was."""
    where = Path(where).absolute()
    free = free_bytes(where)
    have = f"{free / 2**20:.0f} MiB free" if free is not None else "free space unknown"
    more = f", about {need / 2**20:.0f} MiB needed" if need else ""
    return ResourceError(
        f"no space left on the disk holding {where} while {what} ({have}{more}); "
        f"{kept + '; ' if kept else ''}free some space and retry"
    )


@contextlib.contextmanager
def reporting_disk_full(
    where: str | os.PathLike, what: str, *, need: int | None = None, kept: str | None = None
) -> Iterator[None]:
    """Turn a full-disk error raised inside into :func:`disk_full_error`; others pass through."""
    try:
        yield
    except Exception as exc:
        if is_disk_full(exc, where):
            raise disk_full_error(where, what, need=need, kept=kept) from None
        raise
