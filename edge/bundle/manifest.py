"""The bundle: a self-describing, verifiable directory of edge artefacts (the reading side).

```
BUNDLE/
  manifest.json     {"format": "medgemma-edge-bundle/1", "created", "tool_version", "components"}
  medgemma/         text-<QUANT>.gguf ..., mmproj-<TYPE>.gguf
  medsiglip/        vision-<PREC>.onnx, text-<PREC>.onnx, tokenizer, preprocess.json, ...
  NOTICE            the licence terms of every component and what was modified
```

Each component lists its files (path, role, bytes, sha256 and format details). Exporters write
through :class:`edge.bundle.write.BundleWriter`, which builds the new bundle in a staging
directory beside the old one and swaps it into place atomically: an interrupted export leaves
the previous bundle as it was. :func:`open_bundle` reads a manifest (first repairing a swap a
crash interrupted); :meth:`Bundle.verify` re-hashes files (or trusts a stamp keyed by size and
mtime that an earlier verify left) and checks each file's header.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge import __version__
from edge.bundle.atomic import recover_interrupted_swap, write_json_atomic
from edge.errors import InputError, IntegrityError
from edge.files import FileMissing, kind_of, read_json

log = logging.getLogger(__name__)

FORMAT = "medgemma-edge-bundle/1"
MANIFEST = "manifest.json"
NOTICE = "NOTICE"
STAMP = ".verified.json"
COMPONENTS = ("medgemma", "medsiglip")
_HASH_CHUNK = 8 << 20
MAX_MANIFEST_BYTES = 8 << 20  # manifest.json and the verify stamp: read whole, at most 8 MiB

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
            stamp = read_json(self._stamp_path(), limit=MAX_MANIFEST_BYTES, what="verify stamp")
        except (OSError, InputError):
            return {}  # no stamp (or a damaged one): every file is re-hashed
        return stamp if isinstance(stamp, dict) else {}

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
            if not stat.S_ISREG(st.st_mode):  # a FIFO would block the hash; a device never ends
                rep.error = f"{kind_of(st.st_mode)}, not a regular file"
                new_stamp.pop(entry["path"], None)
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


def open_bundle(root: str | os.PathLike) -> Bundle:
    """Read and validate ``root/manifest.json``. Raises InputError with what to do."""
    root = Path(root)
    recover_interrupted_swap(root, marker=MANIFEST)
    mpath = root / MANIFEST
    if not root.is_dir():
        if root.exists():
            raise InputError(f"bundle {root} is {kind_of(root.stat().st_mode)}, not a bundle directory")
        raise InputError(
            f"bundle {root} does not exist; build one with `medgemma-edge export` or `make demo`"
        )
    try:
        manifest = read_json(
            mpath,
            limit=MAX_MANIFEST_BYTES,
            what="bundle manifest",
            hint="; the bundle is damaged, re-export it",
        )
    except FileMissing:
        raise InputError(f"{root} is not a bundle: it has no {MANIFEST}") from None
    if not isinstance(manifest, dict):
        raise InputError(f"{mpath} is not a JSON object; the bundle is damaged, re-export it")
    fmt = manifest.get("format")
    if fmt != FORMAT:
        raise InputError(
            f"{mpath}: format {fmt!r} is not {FORMAT!r}; this runtime ({__version__}) can't read it"
        )
    if not isinstance(manifest.get("components"), dict):
        raise InputError(f"{mpath}: no components; the bundle is damaged, re-export it")
    for name, comp in manifest["components"].items():
        files = comp.get("files", []) if isinstance(comp, dict) else None
        if not isinstance(files, list) or not all(
            isinstance(f, dict) and isinstance(f.get("path", ""), str) for f in files
        ):
            raise InputError(f"{mpath}: component {name} is malformed; the bundle is damaged, re-export it")
        for f in files:
            rel = Path(f.get("path", ""))
            if rel.is_absolute() or ".." in rel.parts or not rel.parts:
                raise InputError(f"{mpath}: component {name} lists an unsafe path {str(rel)!r}")
    return Bundle(root, manifest)
