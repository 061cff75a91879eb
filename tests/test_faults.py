"""Fault injection, each fault in a real process: a full disk, SIGKILL mid-commit, a damaged index
database, two writers at once (issue #14).

* **Disk full** during an export, an ``index add`` and a bundle commit: the target lives on a
  small tmpfs mounted for the test (root only; skipped otherwise), filled to the last byte by a
  ballast file at a chosen moment. The child process is the real CLI (``cli.main``); the only
  thing its script adds is the ballast, written when a chosen library function is first called.
  The ENOSPC that follows is the kernel's. Expected: exit 4, one line naming the disk, no
  traceback, the previous bundle or index as it was, nothing left beside it.
* **SIGKILL during a bundle commit**: the child pauses at a chosen point of
  :class:`edge.bundle.write.BundleWriter`'s commit (it wraps the step, writes a marker file and
  sleeps); the test kills it with SIGKILL. Then :func:`edge.bundle.manifest.open_bundle` must
  give the complete old or the complete new bundle, verified, and leave no litter.
* **A damaged index database** (truncated, zeroed, overwritten): every verb says so in one line
  with the recovery, and ``index repair`` rebuilds it from the paths it records.
* **Two processes adding to one index at once**: no duplicate, no lost row.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tmpfs, SIGKILL: Linux")

# The child's script: fill DISK with a ballast file when TARGET (module:function) is first called,
# or (with "pause") write MARKER and sleep there, waiting for the SIGKILL; then run the CLI.
CHILD = r"""
import errno, importlib, os, sys, time
mode, target, where, *argv = sys.argv[1:]

def fill(disk):
    with open(os.path.join(disk, "ballast"), "wb", buffering=0) as f:
        chunk = 1 << 20
        while chunk >= 512:
            try:
                f.write(b"\0" * chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                chunk //= 2

def pause(marker):
    open(marker, "w").close()
    time.sleep(600)

mod_name, _, fn_name = target.partition(":")
after = fn_name.endswith("+")  # pause after the real call returns, not before
fn_name = fn_name.rstrip("+")
mod = importlib.import_module(mod_name)
real = getattr(mod, fn_name)
hit = []

def patched(*a, **k):
    if not hit:
        hit.append(1)
        if mode == "fill":
            fill(where)
        elif not after:
            pause(where)
    out = real(*a, **k)
    if mode == "pause" and after:
        pause(where)
    return out

setattr(mod, fn_name, patched)
if argv[0] == "--writer":  # a BundleWriter replacing component medgemma of bundle argv[1]
    from edge.bundle.write import BundleWriter
    if argv[2] == "no-exchange":
        import edge.bundle.atomic as atomic
        atomic._exchange = lambda a, b: False
    with BundleWriter(argv[1], "medgemma") as w:
        for name in ("a.bin", "b.bin"):
            w.path(f"medgemma/{name}").write_bytes(b"new " * 50_000)
            w.add_file(f"medgemma/{name}", role="test")
        w.component["version"] = "new"
    sys.exit(0)
from medgemma_edge import cli
sys.exit(cli.main(argv))
"""


def child(mode: str, target: str, where: Path, *argv: str, wait: bool = True, timeout: float = 300):
    """Run CHILD (see above); ``wait=False`` returns the Popen."""
    cmd = [sys.executable, "-c", CHILD, mode, target, str(where), *argv]
    if not wait:
        return subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """Assert ``r`` failed with ``code`` and one ``error:`` line containing ``needles``; return it."""
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("medgemma-edge: error:")]
    assert r.returncode == code and len(errors) == 1, (r.returncode, r.stderr)
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB tmpfs mounted at tmp_path/disk (unmounted after); skipped where mounting is not
    allowed (not root, or no tmpfs)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"can't mount a small tmpfs here ({r.stderr.strip() or 'mount failed'}): needs root")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def litter(parent: Path, *keep: str) -> list[str]:
    """What is in ``parent`` besides ``keep`` and the writer's lock files."""
    return sorted(p for p in os.listdir(parent) if p not in keep and not p.endswith(".lock"))


# --- a small GGUF bundle, exported once ---------------------------------------------------------------


@pytest.fixture(scope="session")
def small_gguf_bundle(medgemma_twin, tmp_path_factory) -> Path:
    """The tiny twin exported Q8_0 + mmproj f16, no fidelity (a few hundred KB, ~3 s)."""
    from export.gguf.convert import export_medgemma

    root = tmp_path_factory.mktemp("faults-gguf") / "bundle"
    export_medgemma(medgemma_twin, bundle=root, quants="Q8_0", mmproj="f16", fidelity=False, threads=2)
    return root


def _assert_bundle_as_before(bundle: Path, manifest_bytes: bytes) -> None:
    from edge.bundle.manifest import open_bundle

    assert (bundle / "manifest.json").read_bytes() == manifest_bytes
    assert open_bundle(bundle).verify(trust_stamp=False).ok


# --- disk full -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "when",
    [
        "export.gguf.convert:convert",  # the converter's first write
        "export.gguf.convert:quantize",  # llama.cpp's quantizer (C++ writes)
        "edge.bundle.write:sha256_file",  # the commit: manifest and NOTICE
    ],
    ids=["convert", "quantize", "commit"],
)
def test_disk_full_during_export_keeps_the_bundle(small_disk, small_gguf_bundle, medgemma_twin, when):
    bundle = small_disk / "bundle"
    shutil.copytree(small_gguf_bundle, bundle)
    before = (bundle / "manifest.json").read_bytes()
    r = child(
        "fill",
        when,
        small_disk,
        *("export", "medgemma", str(medgemma_twin), "--bundle", str(bundle)),
        *("--quant", "Q8_0,Q4_0", "--mmproj", "f16", "--no-fidelity", "--threads", "2"),
    )
    one_line_error(r, 4, f"no space left on the disk holding {small_disk}", "bundle was left as it was")
    (small_disk / "ballast").unlink()
    _assert_bundle_as_before(bundle, before)
    assert litter(small_disk, "bundle") == []  # no scratch or staging directory


def test_disk_full_during_import_commit_keeps_the_bundle(small_disk, small_gguf_bundle):
    bundle = small_disk / "bundle"
    shutil.copytree(small_gguf_bundle, bundle)
    before = (bundle / "manifest.json").read_bytes()
    gguf = small_disk.parent / "text.gguf"  # off the small disk
    shutil.copyfile(small_gguf_bundle / "medgemma" / "text-Q8_0.gguf", gguf)
    r = child(
        "fill",
        "edge.bundle.write:sha256_file",
        small_disk,
        *("import", "medgemma", str(gguf), "--bundle", str(bundle), "--json"),
    )
    one_line_error(r, 4, f"no space left on the disk holding {small_disk}")
    assert json.loads(r.stdout)["error"]["exit_code"] == 4
    (small_disk / "ballast").unlink()
    _assert_bundle_as_before(bundle, before)
    assert litter(small_disk, "bundle") == []


def test_disk_full_during_index_add_keeps_the_index(
    small_disk, cases_samples, int8_encoder, medsiglip_bundle
):
    from edge.cases.index import CaseIndex

    root = small_disk / "index"
    with CaseIndex.open(root, encoder=int8_encoder, create=True) as idx:
        idx.add([cases_samples / "film"], encoder=int8_encoder, copy=True)
        n = idx.count()
    # fill the disk as the first new image is copied in (its temp copy fails half-written)
    r = child(
        "fill",
        "edge.cases.ingest:_copy_in",
        small_disk,
        *("index", "-b", str(medsiglip_bundle), "--index", str(root), "add", str(cases_samples), "--copy"),
        "--batch-size",
        "2",
    )
    one_line_error(r, 4, f"no space left on the disk holding {root}", "committed cases are kept")
    (small_disk / "ballast").unlink()
    with CaseIndex.open(root, encoder=int8_encoder) as idx:
        idx.check()
        assert idx.count() == n
        hits = idx.search_image(next((cases_samples / "film").iterdir()), encoder=int8_encoder, k=2)
        assert hits and hits[0].score > 0.99
    left = [p.name for p in (root / "files").rglob(".*")]
    assert left == []  # no half-written copy
    assert litter(root, "cases.sqlite", "cases.sqlite-wal", "cases.sqlite-shm", "files") == []
    # and once there is room again, the same add completes
    r = run_cli(
        "index", "-b", str(medsiglip_bundle), "--index", str(root), "add", str(cases_samples), "--copy"
    )
    assert r.returncode == 0, r.stderr


# --- SIGKILL during a bundle commit ------------------------------------------------------------------

# (where the child pauses, whether the exchange syscall is used, which bundle must be there after)
KILL_POINTS = [
    ("edge.bundle.write:sha256_file", "exchange", "old"),  # hashing the staged files
    ("edge.bundle.write:swap_into_place", "exchange", "old"),  # staged, fsynced, not swapped
    ("edge.bundle.atomic:_exchange+", "exchange", "new"),  # swapped, the old one not yet removed
    ("shutil:rmtree", "exchange", "new"),  # removing the old one
    ("os:rename+", "no-exchange", "old"),  # fallback: old renamed aside, new not yet in
    ("shutil:rmtree", "no-exchange", "new"),  # fallback: new in place, old not yet removed
]


def _old_bundle(root: Path) -> None:
    from edge.bundle.write import BundleWriter

    for comp, name, data in (("medsiglip", "v.bin", b"vision"), ("medgemma", "a.bin", b"old " * 50_000)):
        with BundleWriter(root, comp) as w:
            w.path(f"{comp}/{name}").write_bytes(data)
            w.add_file(f"{comp}/{name}", role="test")
            w.component["version"] = "old"


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited {proc.returncode} before pausing: {proc.stderr.read()}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError("child never reached the pause point")
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("point", "swap", "expect"), KILL_POINTS, ids=[f"{p}-{s}" for p, s, _ in KILL_POINTS]
)
def test_sigkill_during_commit_leaves_old_or_new(tmp_path, point, swap, expect):
    from edge.bundle.manifest import open_bundle

    root = tmp_path / "B"
    _old_bundle(root)
    marker = tmp_path / "paused"
    proc = child("pause", point, marker, "--writer", str(root), swap, wait=False)
    try:
        _wait_for(marker, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    b = open_bundle(root)  # repairs an interrupted swap and removes the litter
    assert b.verify(trust_stamp=False).ok
    comp = b.component("medgemma")
    assert comp["version"] == expect
    names = sorted(Path(f["path"]).name for f in comp["files"])
    assert names == (["a.bin"] if expect == "old" else ["a.bin", "b.bin"])
    assert (root / "medgemma" / "a.bin").read_bytes()[:4] == f"{expect} ".encode()
    assert (root / "medsiglip" / "v.bin").read_bytes() == b"vision"  # the other component, whole
    assert sorted(os.listdir(root / "medgemma")) == names  # never a mix of old and new files
    assert litter(tmp_path, "B", "paused") == []


def test_sigkill_during_export_leaves_no_scratch(tmp_path, small_gguf_bundle, medgemma_twin):
    from edge.bundle.manifest import open_bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(small_gguf_bundle, bundle)
    before = (bundle / "manifest.json").read_bytes()
    marker = tmp_path / "paused"
    argv = ["export", "medgemma", str(medgemma_twin), "--bundle", str(bundle), "--quant", "Q8_0"]
    proc = child("pause", "export.gguf.convert:quantize", marker, *argv, "--no-fidelity", wait=False)
    try:
        _wait_for(marker, proc)
        assert any(p.startswith(".bundle.work-gguf-") for p in os.listdir(tmp_path))
        r = run_cli(*argv, "--no-fidelity")  # a second export meanwhile: refused at once
        one_line_error(r, 2, "another export is writing bundle")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert open_bundle(bundle).verify().ok and (bundle / "manifest.json").read_bytes() == before
    assert litter(tmp_path, "bundle", "paused") == []  # the dead export's scratch is gone


# --- a damaged index database -------------------------------------------------------------------------


@pytest.fixture
def built_index(tmp_path, cases_samples, int8_encoder) -> tuple[Path, int]:
    """An index of every sample (film kept as copies, tagged site=a), closed; (root, count)."""
    from edge.cases.index import CaseIndex

    root = tmp_path / "index"
    with CaseIndex.open(root, encoder=int8_encoder, create=True) as idx:
        idx.add([cases_samples / "film"], encoder=int8_encoder, copy=True, meta={"site": "a"})
        idx.add([cases_samples], encoder=int8_encoder)
        return root, idx.count()


def _damage(db: Path, how: str) -> None:
    data = bytearray(db.read_bytes())
    if how == "truncated-half":
        db.write_bytes(data[: len(data) // 2])
    elif how == "truncated-empty":
        db.write_bytes(b"")
    elif how == "header-zeroed":
        db.write_bytes(bytes(100) + data[100:])
    elif how == "pages-overwritten":  # every page after the first two: garbage
        page = int.from_bytes(data[16:18], "big")
        data[2 * page :] = bytes((i * 37 + 11) % 256 for i in range(len(data) - 2 * page))
        db.write_bytes(data)


@pytest.mark.parametrize("how", ["truncated-half", "truncated-empty", "header-zeroed", "pages-overwritten"])
def test_damaged_index_is_reported_and_repaired(built_index, how, medsiglip_bundle, cases_samples):
    from edge.cases.index import CaseIndex

    root, n = built_index
    _damage(root / "cases.sqlite", how)
    b = str(medsiglip_bundle)
    r = run_cli("index", "--index", str(root), "info")
    one_line_error(r, 3, "is damaged", f"index -b BUNDLE --index {root} repair")
    r = run_cli("index", "--index", str(root), "info", "--json")
    err = json.loads(r.stdout)
    assert err["ok"] is False and err["error"]["exit_code"] == 3 and "repair" in err["error"]["message"]
    image = str(next((cases_samples / "film").iterdir()))
    for verb in (["add", image], ["search", image]):
        args = ["index", "-b", b, "--index", str(root), *verb] if verb[0] == "add" else ["search", "-b", b]
        r = run_cli(*args, *(["--index", str(root), image] if verb[0] == "search" else []))
        one_line_error(r, 3, "is damaged", "repair")
    r = run_cli("index", "-b", b, "--index", str(root), "repair", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert Path(rep["damaged_kept"]).is_file()
    with CaseIndex.open(root) as idx:
        idx.check()
        # what was readable is back from its recorded path; the copies always (rows or not)
        assert idx.count() == rep["total"] >= 4 and rep["added"] >= rep["readable"] - len(rep["missing"])
        assert len(idx._filter_ids({"site": "a"})) in (0, 4)  # 0: the film rows were unreadable
    # the recovery the error offers works; any cases it could not read are added again by an add
    r = run_cli("index", "-b", b, "--index", str(root), "add", str(cases_samples), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["total"] == n
    r = run_cli("search", "-b", b, "--index", str(root), image, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["results"][0]["score"] > 0.99


def test_repair_keeps_sources_copies_and_metadata(built_index, medsiglip_bundle):
    from edge.cases.index import CaseIndex

    root, n = built_index
    with contextlib.closing(sqlite3.connect(root / "cases.sqlite")) as conn:
        before = sorted(conn.execute("SELECT content_hash, source, stored FROM cases"))
    data = (root / "cases.sqlite").read_bytes()
    (root / "cases.sqlite").write_bytes(data[: len(data) - 100])  # the last page is cut short
    r = run_cli("index", "-b", str(medsiglip_bundle), "--index", str(root), "repair")
    assert r.returncode == 0, r.stderr
    assert f"index has {n} cases" in r.stdout
    with CaseIndex.open(root) as idx:
        after = sorted(idx.conn.execute("SELECT content_hash, source, stored FROM cases"))
        assert after == before and len(idx._filter_ids({"site": "a"})) == 4
    r = run_cli("index", "-b", str(medsiglip_bundle), "--index", str(root), "repair")
    one_line_error(r, 2, "not damaged")


# --- two writers ----------------------------------------------------------------------------------


def test_two_processes_adding_at_once(tmp_path, cases_samples, medsiglip_bundle):
    root = tmp_path / "index"
    kinds = sorted(p for p in cases_samples.iterdir() if p.is_dir())
    a, b = kinds[: len(kinds) // 2 + 1], kinds[len(kinds) // 2 :]  # they overlap by one folder
    procs = []
    for i, dirs in enumerate((a, b)):
        cmd = [
            sys.executable,
            "-m",
            "medgemma_edge",
            "index",
            "-b",
            str(medsiglip_bundle),
            "--index",
            str(root),
        ]
        cmd += ["add", *map(str, dirs), "--batch-size", "1", "--json", *(["--copy"] if i else [])]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0 and "Traceback" not in err, err
    reps = [json.loads(out) for out, _ in outs]
    files = {str(f.resolve()) for d in kinds for f in d.iterdir()}
    with contextlib.closing(sqlite3.connect(root / "cases.sqlite")) as conn:
        sources = [r[0] for r in conn.execute("SELECT source FROM cases")]
        hashes = [r[0] for r in conn.execute("SELECT content_hash FROM cases")]
        orphans = conn.execute("SELECT COUNT(*) FROM case_meta WHERE case_id NOT IN (SELECT id FROM cases)")
        assert orphans.fetchone()[0] == 0
    assert sorted(sources) == sorted(files)  # none lost, none twice
    assert len(set(hashes)) == len(hashes)
    assert sum(r["added"] for r in reps) == len(files)
    assert sum(r["added"] + r["duplicates"] for r in reps) == sum(r["files"] for r in reps)
