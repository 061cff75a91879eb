"""Bounded, type-checked reads of the files a user or a client names.

Every path the runtime reads into memory (images and DICOM, schemas, bundle manifests and small
bundle files, checkpoint JSON) goes through :func:`read_bytes` (or :func:`read_text` /
:func:`read_json` on top of it):

- only regular files are read (symbolic links to them are fine): a character or block device,
  a FIFO, a socket or a directory is refused with an :class:`~edge.errors.InputError` that names
  the path and what it is. ``Path.stat().st_size`` is 0 for devices, FIFOs and ``/proc`` files, so
  a size check alone would let ``/dev/zero`` through and read it until the memory runs out;
- the path is checked with :func:`os.stat`, opened with ``O_NONBLOCK`` (a FIFO can't block the
  open) and checked again with :func:`os.fstat` on the opened descriptor, so a file swapped in
  between the check and the open is caught too;
- at most ``limit + 1`` bytes are read even from a regular file, so one that grows while being
  read can't exhaust memory; past the limit it is a :class:`~edge.errors.TooLargeError`;
- a "regular" file that reports size 0 yet has content (``/proc``, ``/sys``) is refused.

Big model files are memory-mapped by llama.cpp and onnxruntime, not read here: for those only
:func:`check_regular` applies. :func:`walk_files` walks a folder, yielding its regular files and
reporting every other entry it skipped. This module is the ground floor: it imports only the
standard library and :mod:`edge.errors`.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edge.errors import InputError, TooLargeError

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 8 << 20  # 8 MiB: manifests, schemas, checkpoint configs, preprocess specs
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)  # a FIFO opens at once instead of waiting for a writer
    | getattr(os, "O_NOCTTY", 0)  # a terminal device never becomes our controlling terminal
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)  # Windows
)


class FileMissing(InputError):
    """The path does not exist (an InputError, exit 3); callers catch it to say what to do."""


_KINDS = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symbolic link"),
)


def kind_of(mode: int) -> str:
    """What a ``st_mode`` describes, as a noun phrase: "a directory", "a FIFO (named pipe)", ..."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def format_bytes(n: int) -> str:
    """``n`` bytes for a message: "512 MiB", "8 MiB", "3.2 KiB", "100 B"."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.0f} {unit}" if v >= 10 or v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


def _os_error(exc: OSError, path: os.PathLike | str, what: str) -> InputError:
    """An OSError from stat/open/read as the InputError the user sees."""
    if isinstance(exc, FileNotFoundError):
        return FileMissing(f"{what} {path} does not exist")
    if isinstance(exc, NotADirectoryError):
        return FileMissing(f"{what} {path} does not exist (a part of the path is not a folder)")
    if isinstance(exc, IsADirectoryError):
        return InputError(f"{what} {path} is a directory, not a regular file")
    return InputError(f"{what} {path}: can't read it ({exc.strerror or exc})")


def _refuse(path: os.PathLike | str, what: str, mode: int) -> InputError:
    return InputError(f"{what} {path} is {kind_of(mode)}, not a regular file")


def check_regular(path: str | os.PathLike, what: str = "file") -> os.stat_result:
    """``os.stat(path)`` of a regular file (symbolic links followed), else an error naming it.

    Args:
        what: the noun the messages use for the path ("image", "schema", "bundle manifest").
    Raises:
        FileMissing: the path does not exist (also a broken symbolic link).
        InputError: it is a directory, a device, a FIFO, a socket, or can't be stat'ed.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _os_error(exc, path, what) from None
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, what, st.st_mode)
    return st


def _too_large(path, what: str, size: int, limit: int, *, at_least: bool = False) -> TooLargeError:
    more = "more than " if at_least else ""
    return TooLargeError(
        f"{what} {path}: {more}{format_bytes(size)} is over the {format_bytes(limit)} {what} limit"
    )


def read_bytes(path: str | os.PathLike, *, limit: int, what: str = "file") -> bytes:
    """The content of the regular file ``path``, at most ``limit`` bytes.

    Reads at most ``limit + 1`` bytes, so a file that grows while being read (or a pseudo file
    that never ends) can't exhaust memory.

    Args:
        limit: the largest size accepted, in bytes.
        what: the noun the messages use for the path ("image", "schema", "bundle manifest").
    Raises:
        FileMissing: the path does not exist.
        InputError: not a regular file (directory, device, FIFO, socket, a ``/proc``-style file
            that reports size 0 but has content), or it can't be opened or read.
        TooLargeError: the file is over ``limit`` bytes.
    """
    st = check_regular(path, what)  # before the open: opening a device can have side effects
    if st.st_size > limit:
        raise _too_large(path, what, st.st_size, limit)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise _os_error(exc, path, what) from None
    try:
        fst = os.fstat(fd)  # what was opened, not what was stat'ed: a swap in between is caught
        if not stat.S_ISREG(fst.st_mode):
            raise _refuse(path, what, fst.st_mode)
        if fst.st_size > limit:
            raise _too_large(path, what, fst.st_size, limit)
        chunks: list[bytes] = []
        got = 0
        while got <= limit:
            chunk = os.read(fd, min(limit + 1 - got, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as exc:
        raise _os_error(exc, path, what) from None
    finally:
        os.close(fd)
    if got > limit:
        raise _too_large(path, what, got - 1, limit, at_least=True)
    if got and fst.st_size == 0:
        raise InputError(
            f"{what} {path} reports size 0 but has content: a /proc- or /sys-style file, not a regular file"
        )
    return b"".join(chunks)


def read_text(
    path: str | os.PathLike, *, limit: int = MAX_JSON_BYTES, what: str = "file", encoding: str = "utf-8"
) -> str:
    """:func:`read_bytes` decoded as ``encoding``; undecodable bytes are an InputError.

    Default limit: :data:`MAX_JSON_BYTES` (8 MiB).
    """
    data = read_bytes(path, limit=limit, what=what)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {path} is not {encoding} text ({exc.reason} at byte {exc.start})") from None


def read_json(
    path: str | os.PathLike, *, limit: int = MAX_JSON_BYTES, what: str = "file", hint: str = ""
) -> Any:
    """The JSON value in ``path`` (UTF-8, at most ``limit`` bytes; default 8 MiB).

    Args:
        hint: appended to the "not valid JSON" message (e.g. "; re-export the bundle").
    Raises:
        FileMissing, InputError, TooLargeError: as :func:`read_bytes`; and InputError when the
        content is not valid JSON (or nested too deeply to parse).
    """
    data = read_bytes(path, limit=limit, what=what)
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = str(exc) if not isinstance(exc, RecursionError) else "nested too deeply"
        raise InputError(f"{what} {path} is not valid JSON ({reason}){hint}") from None


def walk_files(
    root: str | os.PathLike,
    *,
    skipped: list[tuple[str, str]] | None = None,
    hidden: bool = False,
) -> Iterator[Path]:
    """Every regular file under the folder ``root`` (recursive, sorted; symbolic links to
    regular files included, linked folders not descended).

    Every other entry (device, FIFO, socket, broken link, an unreadable folder) is skipped and,
    when ``skipped`` is given, appended to it as ``(path, one-line reason)``.

    Args:
        hidden: also walk names that start with "." (default: they are left out silently).
    """

    def report(path: str, reason: str) -> None:
        log.info("skipped %s: %s", path, reason)
        if skipped is not None:
            skipped.append((path, reason))

    def on_error(exc: OSError) -> None:
        report(str(exc.filename or root), f"can't read the folder ({exc.strerror or exc})")

    for dirpath, dirs, files in os.walk(root, onerror=on_error):
        dirs[:] = sorted(d for d in dirs if hidden or not d.startswith("."))
        for name in sorted(files):
            if not hidden and name.startswith("."):
                continue
            p = Path(dirpath) / name
            try:
                st = os.stat(p)
            except FileNotFoundError:
                report(str(p), "does not exist (a broken symbolic link?); skipped")
                continue
            except OSError as exc:
                report(str(p), f"can't read it ({exc.strerror or exc})")
                continue
            if not stat.S_ISREG(st.st_mode):
                report(str(p), f"{kind_of(st.st_mode)}, not a regular file; skipped")
                continue
            yield p


DATA_ENV = "MEDGEMMA_EDGE_DATA"


def data_dir() -> Path:
    """The runtime's data directory on this device: received studies (``studies/``), saved
    reports and their outbox (``reports/``). ``$MEDGEMMA_EDGE_DATA``, else
    ``$XDG_DATA_HOME/medgemma-edge``, else ``~/.local/share/medgemma-edge``. Not created here."""
    override = os.environ.get(DATA_ENV)
    if override:
        return Path(override)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "medgemma-edge"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a temp file named after it may still be written).

    This process counts as gone: it writes one at a time, so its own leftovers are litter.
    """
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
