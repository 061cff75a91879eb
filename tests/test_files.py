"""edge.files: bounded, type-checked reads, and the readers that use it (images, index add/import)."""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge import files
from edge.errors import InputError, TooLargeError
from edge.files import FileMissing, check_regular, read_bytes, read_json, read_text, walk_files
from edge.media.images import load_image

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs and /dev/zero are POSIX")


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(0).rand(8, 8, 3) * 255).astype("uint8")).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def special(tmp_path) -> dict[str, Path]:
    """A FIFO, a Unix socket, a directory, /dev/zero, a PNG and a symbolic link to it."""
    os.mkfifo(tmp_path / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    (tmp_path / "dir").mkdir()
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "link.png").symlink_to(tmp_path / "a.png")
    yield {
        "fifo": tmp_path / "fifo",
        "socket": tmp_path / "sock",
        "dir": tmp_path / "dir",
        "zero": Path("/dev/zero"),
        "png": tmp_path / "a.png",
        "link": tmp_path / "link.png",
    }
    sock.close()


def _finishes(fn, timeout: float = 10.0):
    """Run ``fn`` in a thread; fail (rather than hang the suite) if it blocks. Returns its exception."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            out["exc"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the read blocked"
    return out.get("exc")


NOT_REGULAR = [
    ("fifo", "a FIFO"),
    ("socket", "a socket"),
    ("dir", "a directory"),
    ("zero", "a character device"),
]


@pytest.mark.parametrize("name,kind", NOT_REGULAR)
def test_read_bytes_refuses_what_is_not_a_regular_file(special, name, kind):
    exc = _finishes(lambda: read_bytes(special[name], limit=1 << 20, what="image"))
    assert isinstance(exc, InputError) and not isinstance(exc, TooLargeError)
    assert str(special[name]) in str(exc) and kind in str(exc) and "not a regular file" in str(exc)
    with pytest.raises(InputError, match=kind):
        check_regular(special[name], "image")


@pytest.mark.parametrize("name,kind", NOT_REGULAR)
def test_load_image_refuses_what_is_not_a_regular_file(special, name, kind):
    exc = _finishes(lambda: load_image(special[name]))
    assert isinstance(exc, InputError) and kind in str(exc), exc


def test_symlink_to_a_regular_file_is_read(special):
    assert read_bytes(special["link"], limit=1 << 20) == special["png"].read_bytes()
    assert load_image(special["link"]).key == load_image(special["png"]).key
    assert stat.S_ISREG(check_regular(special["link"]).st_mode)


def test_missing_and_broken_link(tmp_path):
    with pytest.raises(FileMissing, match="schema .* does not exist"):
        read_bytes(tmp_path / "nope.json", limit=10, what="schema")
    (tmp_path / "broken").symlink_to(tmp_path / "gone")
    with pytest.raises(FileMissing, match="does not exist"):
        read_bytes(tmp_path / "broken", limit=10)
    with pytest.raises(FileMissing, match="not a folder"):
        read_bytes("/dev/zero/x", limit=10)


def test_limit_is_exact(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x" * 100)
    assert read_bytes(p, limit=100) == b"x" * 100
    with pytest.raises(TooLargeError, match="image .*100 B is over the 99 B image limit"):
        read_bytes(p, limit=99, what="image")
    with pytest.raises(TooLargeError, match="image limit"):
        load_image(p, max_bytes=99)


def test_a_file_that_grows_is_read_at_most_limit_plus_one(tmp_path, monkeypatch):
    """stat and fstat say 10 bytes (the size when checked); the file then has far more: the
    read stops after limit + 1 bytes and reports it as too large, never reading it all."""
    p = tmp_path / "growing"
    p.write_bytes(b"y" * 10)
    real_stat, real_fstat = os.stat, os.fstat
    with open(p, "ab") as f:
        f.write(b"y" * (5 << 20))  # grew after the checks below report its old size
    reads: list[int] = []
    real_read = os.read

    def small(st):
        return os.stat_result((st.st_mode, *tuple(st)[1:6], 10, *tuple(st)[7:]))

    monkeypatch.setattr(files.os, "stat", lambda path, *a, **k: small(real_stat(path, *a, **k)))
    monkeypatch.setattr(files.os, "fstat", lambda fd: small(real_fstat(fd)))
    monkeypatch.setattr(files.os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    with pytest.raises(TooLargeError, match="more than 1 KiB is over the 1 KiB file limit"):
        read_bytes(p, limit=1024)
    assert sum(reads) == 1025


def test_a_file_growing_from_a_thread(tmp_path):
    """A writer keeps appending while the file is read: refused as too large, never read to the end."""
    p = tmp_path / "log"
    p.write_bytes(b"")
    stop = threading.Event()

    def writer():
        with open(p, "ab", buffering=0) as f:
            while not stop.is_set() and f.tell() < (64 << 20):
                f.write(b"z" * 65536)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        while p.stat().st_size < (2 << 20):
            pass
        with pytest.raises(TooLargeError):
            read_bytes(p, limit=1 << 20)
    finally:
        stop.set()
        t.join()


def test_swap_between_stat_and_open_is_caught(special, monkeypatch):
    """os.stat saw a regular file, but a FIFO is what gets opened: fstat on the descriptor refuses it."""
    regular = os.stat(special["png"])
    monkeypatch.setattr(files.os, "stat", lambda path, *a, **k: regular)
    exc = _finishes(lambda: read_bytes(special["fifo"], limit=1 << 20, what="image"))
    assert isinstance(exc, InputError) and "a FIFO" in str(exc)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="no /proc")
def test_proc_style_file_reporting_size_zero_is_refused():
    assert os.stat("/proc/self/status").st_size == 0 and stat.S_ISREG(os.stat("/proc/self/status").st_mode)
    with pytest.raises(InputError, match="reports size 0"):
        read_bytes("/proc/self/status", limit=1 << 20)


def test_read_text_and_json(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"type": "object"}))
    assert read_json(p, what="schema") == {"type": "object"}
    assert read_text(p) == p.read_text()
    p.write_bytes(b"\xff\xfe{")
    with pytest.raises(InputError, match="not utf-8 text"):
        read_text(p)
    with pytest.raises(InputError, match="not valid JSON"):
        read_json(p)
    p.write_text("{nope")
    with pytest.raises(InputError, match=r"schema .* is not valid JSON .*; re-export"):
        read_json(p, what="schema", hint="; re-export")
    p.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError, match="nested too deeply"):
        read_json(p)
    p.write_text(json.dumps({"k": "v" * 100}))
    with pytest.raises(TooLargeError):
        read_json(p, limit=50)


def test_walk_files_yields_regular_files_and_reports_the_rest(special, tmp_path):
    (tmp_path / ".hidden.png").write_bytes(b"x")
    (tmp_path / "dir" / "b.png").write_bytes(_png())
    (tmp_path / "broken.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    skipped: list[tuple[str, str]] = []
    got = list(walk_files(tmp_path, skipped=skipped))  # only stats: a FIFO can't block it
    assert [p.name for p in got] == ["a.png", "link.png", "b.png"]
    reasons = {Path(p).name: r for p, r in skipped}
    assert set(reasons) == {"fifo", "sock", "broken.png", "zero.png"}
    assert "FIFO" in reasons["fifo"] and "socket" in reasons["sock"]
    assert "character device" in reasons["zero.png"] and "does not exist" in reasons["broken.png"]


def test_index_add_walk_skips_and_reports_special_files(special, tmp_path):
    from edge.cases.ingest import iter_files

    skipped: list[tuple[str, str]] = []
    got = list(iter_files([tmp_path], skipped=skipped))
    assert {p.name for p in got} == {"a.png", "link.png"}
    assert {Path(p).name for p, _ in skipped} == {"fifo", "sock"}
    for name in ("fifo", "zero", "socket"):  # given by name: refused, never read
        exc = _finishes(lambda n=name: list(iter_files([special[n]])))
        assert isinstance(exc, InputError) and "not a regular file" in str(exc)
    with pytest.raises(InputError, match="does not exist"):
        list(iter_files([tmp_path / "nope"]))


# --- index import: tar members --------------------------------------------------------------


def _archive(path: Path, members: list[tarfile.TarInfo], manifest: dict | bytes | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        if manifest is not None:
            data = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
            ti = tarfile.TarInfo("manifest.json")
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
        for m in members:
            tar.addfile(m, io.BytesIO(b"\0" * m.size) if m.isfile() else None)
    return path


MANIFEST = {
    "format": "medgemma-edge-cases-export/1",
    "fingerprint": "f",
    "cases": 0,
    "files": {"cases.sqlite": {"bytes": 0, "sha256": "0" * 64}},
}


def _member(name: str, kind: bytes, **kw) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


@pytest.mark.parametrize(
    "member,kind",
    [
        (_member("cases.sqlite", tarfile.SYMTYPE, linkname="/etc/passwd"), "a symbolic link"),
        (_member("cases.sqlite", tarfile.LNKTYPE, linkname="manifest.json"), "a hard link"),
        (_member("cases.sqlite", tarfile.CHRTYPE, devmajor=1, devminor=5), "a character device"),
        (_member("cases.sqlite", tarfile.FIFOTYPE), "a FIFO"),
        (_member("other", tarfile.SYMTYPE, linkname="/"), "a symbolic link"),  # not even listed
    ],
)
def test_import_refuses_links_devices_and_fifos(tmp_path, member, kind):
    from edge.cases.transfer import import_index

    archive = _archive(tmp_path / "x.tar", [member], MANIFEST)
    with pytest.raises(InputError, match=f"is {kind}, not a regular file"):
        import_index(archive, tmp_path / "idx")
    assert not (tmp_path / "idx").exists() and [p.name for p in tmp_path.iterdir()] == ["x.tar"]


def test_import_bounds_members(tmp_path, monkeypatch):
    from edge.cases import transfer

    big = _member("cases.sqlite", tarfile.REGTYPE, size=4096)
    man = {**MANIFEST, "files": {"cases.sqlite": {"bytes": 4096, "sha256": "0" * 64}}}
    monkeypatch.setattr(transfer, "MAX_DB_BYTES", 1024)
    with pytest.raises(TooLargeError, match="over the 1 KiB limit"):
        transfer.import_index(_archive(tmp_path / "big.tar", [big], man), tmp_path / "i1")
    lying = {**MANIFEST, "files": {"cases.sqlite": {"bytes": 10, "sha256": "0" * 64}}}
    small = _member("cases.sqlite", tarfile.REGTYPE, size=20)
    with pytest.raises(InputError, match="manifest size"):
        transfer.import_index(_archive(tmp_path / "lie.tar", [small], lying), tmp_path / "i2")
    huge_manifest = b" " * (files.MAX_JSON_BYTES + 1)
    with pytest.raises(InputError, match="no valid manifest.json"):
        transfer.import_index(_archive(tmp_path / "m.tar", [], huge_manifest), tmp_path / "i3")
    for name in ("fifo", "dir"):
        p = tmp_path / name
        os.mkfifo(p) if name == "fifo" else p.mkdir()
        exc = _finishes(lambda p=p: transfer.import_index(p, tmp_path / "i4"))
        assert isinstance(exc, InputError) and "not a regular file" in str(exc)
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(InputError, match=r"not an index export \(not a tar archive\)$"):
        transfer.import_index(tmp_path / "junk.tar", tmp_path / "i5")
