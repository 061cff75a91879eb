"""The bundle: a self-describing, verifiable directory of edge artefacts.

```
BUNDLE/
  manifest.json     {"format": "medgemma-edge-bundle/1", "created", "tool_version", "components"}
  medgemma/         text-<QUANT>.gguf ..., mmproj-<TYPE>.gguf
  medsiglip/        vision-<PREC>.onnx, text-<PREC>.onnx, tokenizer, preprocess.json, ...
  NOTICE            the licence terms of every component and what was modified
```

Each component lists its files (path, role, bytes, sha256 and format details). Exporters write
through :class:`BundleWriter`, which builds the new bundle in a staging directory beside the old
one and swaps it into place atomically: an interrupted export leaves the previous bundle as it
was. :func:`open_bundle` reads a manifest; :meth:`Bundle.verify` re-hashes files (or trusts a
stamp keyed by size and mtime that an earlier verify left) and checks each file's header.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge import __version__
from edge.errors import InputError, IntegrityError, UsageError

log = logging.getLogger(__name__)

FORMAT = "medgemma-edge-bundle/1"
MANIFEST = "manifest.json"
NOTICE = "NOTICE"
STAMP = ".verified.json"
COMPONENTS = ("medgemma", "medsiglip")
_HASH_CHUNK = 8 << 20

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks; ``progress(done, total)`` after each."""
    h = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
    return h.hexdigest()


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


# --- header checks, per file suffix (lazily imported: verify must not need torch/onnx) -----------


def _check_header(path: Path, entry: dict) -> dict:
    """Parse the file's header and compare with the manifest. Returns facts for the report."""
    if path.suffix == ".gguf":
        from edge.bundle import gguf_header

        return gguf_header.check(path, entry)
    if path.suffix == ".onnx":
        from edge.bundle import onnx_header

        return onnx_header.check(path, entry)
    return {}


# --- reading ---------------------------------------------------------------------------------------


@dataclass
class FileReport:
    path: str
    role: str
    ok: bool
    bytes: int
    hashed: bool  # False when a valid verify stamp let us skip re-hashing
    error: str | None = None
    facts: dict = field(default_factory=dict)


@dataclass
class VerifyReport:
    bundle: str
    files: list[FileReport]

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.files)

    def raise_for_failure(self) -> None:
        for f in self.files:
            if not f.ok:
                raise IntegrityError(f"{f.path}: {f.error} (bundle {self.bundle}; re-export or re-copy it)")

    def to_json(self) -> dict:
        return {"bundle": self.bundle, "ok": self.ok, "files": [f.__dict__ for f in self.files]}


class Bundle:
    """A bundle on disk, opened read-only. Use :func:`open_bundle`."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest

    @property
    def components(self) -> dict[str, dict]:
        return self.manifest["components"]

    def component(self, name: str) -> dict:
        try:
            return self.components[name]
        except KeyError:
            have = ", ".join(self.components) or "none"
            raise InputError(
                f"bundle {self.root} has no {name} component (it has: {have}); "
                f"run `medgemma-edge export {name} ... --bundle {self.root}`"
            ) from None

    def files(self, component: str | None = None) -> list[dict]:
        names = [component] if component else list(self.components)
        return [f for n in names for f in self.component(n)["files"]]

    def file(self, component: str, role: str, **match: Any) -> dict:
        """The first file of ``component`` with ``role`` (and matching keys, e.g. quant='Q8_0')."""
        for f in self.component(component)["files"]:
            if f["role"] == role and all(f.get(k) == v for k, v in match.items()):
                return f
        want = ", ".join([role] + [f"{k}={v}" for k, v in match.items()])
        have = ", ".join(
            f"{f['role']}:{f.get('quant') or f.get('precision') or ''}"
            for f in self.component(component)["files"]
        )
        raise InputError(f"bundle {self.root}: no {component} file with {want} (have: {have})")

    def path(self, entry: dict | str) -> Path:
        rel = entry["path"] if isinstance(entry, dict) else entry
        return self.root / rel

    @property
    def synthetic(self) -> bool:
        return any(c.get("source", {}).get("synthetic") for c in self.components.values())

    def fingerprint(self, component: str) -> str:
        """A short id of a component's exact files: same files, same fingerprint."""
        h = hashlib.sha256()
        for f in sorted(self.component(component)["files"], key=lambda f: f["path"]):
            h.update(f"{f['path']}\0{f['sha256']}\n".encode())
        return h.hexdigest()[:16]

    # -- verification ---------------------------------------------------------------------------

    def _stamp_path(self) -> Path:
        if os.access(self.root, os.W_OK):
            return self.root / STAMP
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medgemma-edge" / "verified"
        key = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:24]
        return cache / f"{key}.json"

    def _read_stamp(self) -> dict:
        try:
            return json.loads(self._stamp_path().read_text())
        except (OSError, ValueError):
            return {}

    def verify(
        self,
        *,
        component: str | None = None,
        roles: set[str] | None = None,
        paths: set[str] | None = None,
        trust_stamp: bool = True,
        progress: Progress | None = None,
    ) -> VerifyReport:
        """Check every file (or those of ``component``/``roles``/``paths``): size, sha256, header.

        A file whose size and mtime match the stamp an earlier successful verify wrote is not
        re-hashed (``trust_stamp=False`` forces it); its header is still parsed. The stamp is
        updated for every file that passes.
        """
        entries = [
            f
            for f in self.files(component)
            if (roles is None or f["role"] in roles) and (paths is None or f["path"] in paths)
        ]
        saved = self._read_stamp()
        stamp = saved if trust_stamp else {}
        total = sum(f["bytes"] for f in entries)
        done = 0
        reports: list[FileReport] = []
        new_stamp = dict(saved)
        for entry in entries:
            path = self.path(entry)
            rep = FileReport(entry["path"], entry["role"], False, entry["bytes"], hashed=False)
            reports.append(rep)
            try:
                st = path.stat()
            except FileNotFoundError:
                rep.error = "missing"
                continue
            if st.st_size != entry["bytes"]:
                rep.error = (
                    f"size {st.st_size} bytes, manifest says {entry['bytes']} (truncated or replaced?)"
                )
                new_stamp.pop(entry["path"], None)
                continue
            key = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": entry["sha256"]}
            if stamp.get(entry["path"]) != key:
                digest = sha256_file(
                    path, (lambda d, t, b=done: progress(b + d, total)) if progress else None
                )
                rep.hashed = True
                if digest != entry["sha256"]:
                    rep.error = f"sha256 {digest[:12]}… does not match the manifest's {entry['sha256'][:12]}…"
                    new_stamp.pop(entry["path"], None)
                    continue
            done += entry["bytes"]
            try:
                rep.facts = _check_header(path, entry)
            except IntegrityError as exc:
                rep.error = str(exc)
                continue
            rep.ok = True
            new_stamp[entry["path"]] = key
        with contextlib.suppress(OSError):
            sp = self._stamp_path()
            sp.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(sp, new_stamp)
        return VerifyReport(str(self.root), reports)


def _recover_interrupted_swap(root: Path) -> None:
    """If an interrupted commit left the old bundle under a side name, put it back."""
    if root.exists():
        return
    for prev in sorted(root.parent.glob(f".{root.name}.previous-*")):
        if (prev / MANIFEST).is_file():
            log.warning("restoring bundle %s from interrupted update %s", root, prev.name)
            os.rename(prev, root)
            return


def open_bundle(root: str | os.PathLike) -> Bundle:
    """Read and validate ``root/manifest.json``. Raises InputError with what to do."""
    root = Path(root)
    _recover_interrupted_swap(root)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise InputError(
            f"bundle {root} does not exist; build one with `medgemma-edge export` or `make demo`"
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{root} is not a bundle: it has no {MANIFEST}") from None
    except ValueError as exc:
        raise InputError(f"{mpath} is not valid JSON ({exc}); the bundle is damaged, re-export it") from None
    fmt = manifest.get("format")
    if fmt != FORMAT:
        raise InputError(
            f"{mpath}: format {fmt!r} is not {FORMAT!r}; this runtime ({__version__}) can't read it"
        )
    if not isinstance(manifest.get("components"), dict):
        raise InputError(f"{mpath}: no components; the bundle is damaged, re-export it")
    for name, comp in manifest["components"].items():
        for f in comp.get("files", []):
            rel = Path(f.get("path", ""))
            if rel.is_absolute() or ".." in rel.parts or not rel.parts:
                raise InputError(f"{mpath}: component {name} lists an unsafe path {str(rel)!r}")
    return Bundle(root, manifest)


# --- writing ---------------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE). False when unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_into_place(staging: Path, root: Path) -> None:
    if not root.exists():
        os.rename(staging, root)
        return
    if _exchange(staging, root):
        shutil.rmtree(staging)  # now holds the previous bundle
        return
    prev = root.with_name(f".{root.name}.previous-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(root, prev)  # a crash here is repaired by _recover_interrupted_swap
    os.rename(staging, root)
    shutil.rmtree(prev)


def writable_parent(target: Path, hint: str) -> Path:
    """Create ``target``'s parent if needed and check it can be written; InputError (with
    ``hint``) otherwise. Outputs are built beside their target, so the parent must be writable."""
    parent = Path(target).absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"can't create {parent}: {exc.strerror}; {hint}") from None
    if not os.access(parent, os.W_OK):
        raise InputError(f"can't write {target}: {parent} is not writable; {hint}")
    return parent


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    import fcntl

    lock = root.parent / f".{root.name}.lock"
    with open(lock, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another export is writing bundle {root}; wait for it to finish") from None
        yield


class BundleWriter:
    """Write (or replace) one component of a bundle, atomically.

    ```
    with BundleWriter(root, "medgemma") as w:
        out = w.path("medgemma/text-Q8_0.gguf")      # a path in the staging directory
        ...write out...
        w.add_file("medgemma/text-Q8_0.gguf", role="text", quant="Q8_0")
        w.component.update(source=..., fidelity=...)
    ```

    On a clean exit the files are hashed, the other components' files are hard-linked in from
    the current bundle, the manifest and NOTICE are written, and the staging directory is
    swapped into place. On an exception (Ctrl-C included) the staging directory is removed and
    the current bundle is untouched.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        component: str,
        *,
        update: bool = False,
        progress: Progress | None = None,
    ):
        """``update=True`` keeps the component's current files and fields and adds to them (a file
        written at an existing path replaces it); the default replaces the whole component."""
        if component not in COMPONENTS:
            raise UsageError(f"unknown bundle component {component!r} (known: {', '.join(COMPONENTS)})")
        self.root = Path(root).absolute()
        self.name = component
        self.component: dict[str, Any] = {}
        self._files: list[dict] = []
        self._kept: list[dict] = []
        self._update = update
        self._progress = progress
        self._stack = contextlib.ExitStack()
        self.staging: Path | None = None

    def __enter__(self) -> BundleWriter:
        parent = writable_parent(self.root, "choose another --bundle path")
        if self.root.exists() and not (self.root / MANIFEST).is_file():
            if any(self.root.iterdir()):
                raise UsageError(f"{self.root} exists and is not a bundle; choose another --bundle path")
        self._stack.enter_context(_locked(self.root))
        if self._update:
            old = open_bundle(self.root).component(self.name)
            self.component = json.loads(json.dumps({k: v for k, v in old.items() if k != "files"}))
            self._kept = list(old["files"])
        self.staging = parent / f".{self.root.name}.staging-{os.getpid()}-{secrets.token_hex(4)}"
        self.staging.mkdir()
        self._stack.callback(lambda: shutil.rmtree(self.staging, ignore_errors=True))
        return self

    def path(self, rel: str) -> Path:
        """Where to write ``rel`` (relative to the bundle root) before commit."""
        assert self.staging is not None, "use BundleWriter as a context manager"
        p = self.staging / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def add_file(self, rel: str, *, role: str, **details: Any) -> dict:
        """Record a file written under :meth:`path`. Hash and size are filled in at commit."""
        if not rel.startswith(self.name + "/"):
            raise ValueError(f"{rel} is not under {self.name}/")
        entry = {"path": rel, "role": role, **details}
        self._files.append(entry)
        return entry

    def _commit(self) -> None:
        assert self.staging is not None
        total = sum(self.path(f["path"]).stat().st_size for f in self._files)
        done = 0
        for entry in self._files:
            p = self.path(entry["path"])
            t0 = time.perf_counter()
            entry["bytes"] = p.stat().st_size
            entry["sha256"] = sha256_file(
                p, (lambda d, t, b=done: self._progress(b + d, total)) if self._progress else None
            )
            done += entry["bytes"]
            log.info("hashed %s (%d bytes) in %.1fs", entry["path"], entry["bytes"], time.perf_counter() - t0)
        components: dict[str, dict] = {}
        created = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        if (self.root / MANIFEST).is_file():
            old = open_bundle(self.root)
            created = old.manifest.get("created", created)
            for name, comp in old.components.items():
                if name == self.name:
                    continue
                for f in comp["files"]:
                    _link_or_copy(old.path(f), self.staging / f["path"])
                components[name] = comp
            new_paths = {f["path"] for f in self._files}
            self._kept = [f for f in self._kept if f["path"] not in new_paths]
            for f in self._kept:
                _link_or_copy(old.path(f), self.staging / f["path"])
        components[self.name] = {**self.component, "files": self._kept + self._files}
        manifest = {
            "format": FORMAT,
            "created": created,
            "updated": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "tool_version": __version__,
            "components": {n: components[n] for n in COMPONENTS if n in components},
        }
        write_json_atomic(self.staging / MANIFEST, manifest)
        (self.staging / NOTICE).write_text(render_notice(manifest), encoding="utf-8")
        _fsync_tree(self.staging)
        _swap_into_place(self.staging, self.root)
        log.info("bundle %s: component %s written (%d files)", self.root, self.name, len(self._files))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            self._stack.close()


def render_notice(manifest: dict) -> str:
    """The NOTICE file: each component's licence terms and what this tool changed."""
    parts = [
        "This bundle was made by medgemma-edge. Its model files are derived from the models named",
        "below and remain under those models' terms. Outputs are decision support for qualified",
        "professionals under human oversight, not a diagnosis.",
        "",
    ]
    for name, comp in manifest["components"].items():
        src = comp.get("source", {})
        lic = comp.get("licence", {})
        parts += [
            f"== {name} ==",
            f"Source: {src.get('description') or src.get('model_id') or 'unknown'}",
            f"Licence: {lic.get('name', 'unknown')}" + (f" ({lic['url']})" if lic.get("url") else ""),
        ]
        if lic.get("notice"):
            parts.append(lic["notice"].strip())
        if comp.get("modifications"):
            parts.append("Modifications: " + comp["modifications"])
        parts.append("")
    return "\n".join(parts)
