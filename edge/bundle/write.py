"""Writing a bundle: :class:`BundleWriter` builds a component in a staging directory and swaps it in.

The new bundle is assembled beside the current one (``.NAME.staging-*``): the component's new
files, the other components' files hard-linked from the current bundle, a fresh manifest and
NOTICE. Everything is fsynced, then swapped into place (:func:`edge.bundle.atomic.swap_into_place`),
so an interrupted export (an error, Ctrl-C, a full disk, SIGKILL at any point) leaves the
previous bundle as it was. A lock file beside the bundle (``.NAME.lock``) keeps two exports from
writing it at once; the writer that takes it first removes what a killed one left beside the
bundle (:func:`edge.bundle.atomic.sweep_litter`). A full disk is a one-line ResourceError that
names it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edge import __version__
from edge.bundle.atomic import (
    disk_full_error,
    fsync_tree,
    hold_lock,
    holds_lock,
    is_disk_full,
    staging_prefix,
    swap_into_place,
    sweep_litter,
    write_json_atomic,
)
from edge.bundle.manifest import COMPONENTS, FORMAT, MANIFEST, NOTICE, Progress, open_bundle, sha256_file
from edge.errors import InputError, UsageError

log = logging.getLogger(__name__)


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


@contextlib.contextmanager
def locked(root: str | os.PathLike) -> Iterator[None]:
    """Hold bundle ``root``'s writer lock (``.NAME.lock`` beside it) and clear what a killed writer
    left. An exporter holds it for its whole run, so its scratch directory
    (:func:`edge.bundle.atomic.work_prefix`) is never taken for litter; a :class:`BundleWriter`
    opened inside takes it again (re-entrant in one thread).

    Raises:
        UsageError: another export is writing the bundle.
    """
    root = Path(root).absolute()
    first = not holds_lock(root)
    with hold_lock(root, busy=f"another export is writing bundle {root}; wait for it to finish"):
        if first:  # re-entered: the litter-to-be is this thread's own work
            sweep_litter(root)
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
        self._stack.enter_context(locked(self.root))
        if self._update:
            old = open_bundle(self.root).component(self.name)
            self.component = json.loads(json.dumps({k: v for k, v in old.items() if k != "files"}))
            self._kept = list(old["files"])
        self.staging = parent / f"{staging_prefix(self.root)}{os.getpid()}-{secrets.token_hex(4)}"
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
        fsync_tree(self.staging)
        swap_into_place(self.staging, self.root)
        log.info("bundle %s: component %s written (%d files)", self.root, self.name, len(self._files))

    def __exit__(self, exc_type, exc, tb) -> None:
        """Commit on a clean exit; always remove the staging directory. A full disk, in the body
        or in the commit, becomes a ResourceError naming it (the current bundle is untouched)."""
        full = exc is not None and is_disk_full(exc, self.root.parent)
        try:
            if exc_type is None:
                self._commit()
        except Exception as err:
            if not is_disk_full(err, self.root.parent):
                raise
            full = True
        finally:
            self._stack.close()  # the staging directory goes first: the free space reported is real
        if full:
            raise disk_full_error(
                self.root.parent, f"writing bundle {self.root.name}", kept="the bundle was left as it was"
            ) from None


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
