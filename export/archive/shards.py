"""The archive directory: Parquet shards of embeddings plus a manifest bound to one encoder.

```
OUT/
  manifest.json              {"format": "medgemma-edge-archive/1", "fingerprint", "precision", "dim",
                              "model", "created", "updated", "cases", "inputs",
                              "shards": [{"file", "rows", "bytes", "sha256", "inputs", "duplicates",
                                          "failed"}]}
  shards/shard-000000.parquet  columns hash, source, format, width, height, metadata (map), embedding
                               (fixed-size list of float32, L2-normalized); its footer's key
                               ``medgemma-edge`` holds the fingerprint and the inputs it handled
                               without a row (duplicates, failures), so a shard describes itself.
```

A shard is written to a temp name, fsynced and renamed; then the manifest is rewritten (temp +
rename). A run killed between the two leaves a whole shard the manifest does not list: the next
run adopts it (its footer names its fingerprint and inputs). Every input a shard handled (as a
row, a duplicate or a failure) is done: a restarted run lists the inputs again and writes new
shards for the rest only. One writer at a time (a lock beside OUT).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.bundle.atomic import write_json_atomic
from edge.bundle.manifest import sha256_file
from edge.errors import InputError, require
from edge.files import pid_alive, read_json

log = logging.getLogger(__name__)

FORMAT = "medgemma-edge-archive/1"
MANIFEST = "manifest.json"
SHARDS = "shards"
FOOTER_KEY = b"medgemma-edge"
SHARD_RE = re.compile(r"^shard-([0-9]{6,})\.parquet$")
_TMP_RE = re.compile(r"^\.shard-[0-9]+\.parquet\.tmp-([0-9]+)$")


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def schema(dim: int, footer: dict | None = None):
    pa = require("pyarrow", "archive")
    fields = [
        pa.field("hash", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("format", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("metadata", pa.map_(pa.string(), pa.string())),
        pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
    ]
    return pa.schema(fields, metadata={FOOTER_KEY: json.dumps(footer or {}).encode()})


@dataclass
class Encoding:
    """Which embedding space an archive holds (from :class:`edge.medsiglip.model.MedSigLIP`)."""

    fingerprint: str
    precision: str
    dim: int
    model: str

    @classmethod
    def of(cls, encoder) -> Encoding:
        model = str(encoder.bundle.component("medsiglip").get("model", "medsiglip"))
        return cls(encoder.fingerprint, encoder.precision, int(encoder.dim), model)


@dataclass
class Archive:
    """An open archive directory. :meth:`open` checks it; :meth:`write_shard` adds one shard."""

    root: Path
    manifest: dict
    done: set[str] = field(default_factory=set)  # sources some shard handled
    hashes: set[str] = field(default_factory=set)  # content hashes some shard holds

    @classmethod
    def open(
        cls, root: str | os.PathLike, *, encoding: Encoding | None = None, create: bool = False
    ) -> Archive:
        """Open (with ``create``: make) the archive at ``root``; ``encoding`` must match its own.

        Raises:
            InputError: not an archive, a damaged manifest or shard, another encoder's archive.
        """
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            if not create or encoding is None:
                raise InputError(
                    f"{root} is not an archive index (no {MANIFEST}); build one with `medgemma-edge archive index`"
                )
            if root.exists() and not root.is_dir():
                raise InputError(f"{root} exists and is not a directory")
            (root / SHARDS).mkdir(parents=True, exist_ok=True)
            manifest = {
                "format": FORMAT,
                **vars(encoding),
                "created": _now(),
                "updated": _now(),
                "cases": 0,
                "inputs": 0,
                "shards": [],
            }
            write_json_atomic(path, manifest)
        else:
            manifest = read_json(path, what="archive manifest")
            if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
                raise InputError(f"{path} is not a medgemma-edge archive manifest ({FORMAT})")
        arch = cls(root, manifest)
        if encoding is not None:
            arch.check_encoding(encoding.fingerprint, what="this bundle")
        return arch

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def check_encoding(self, fingerprint: str, *, what: str) -> None:
        if fingerprint != self.fingerprint:
            raise InputError(
                f"archive {self.root} was built with another MedSigLIP encoder (fingerprint {self.fingerprint}, "
                f"{self.manifest.get('model')} {self.manifest.get('precision')}); {what} has {fingerprint}: "
                "use the bundle and --precision it was built with, or index into a new --out directory"
            )

    def shard_paths(self) -> list[Path]:
        return [self.root / SHARDS / s["file"] for s in self.manifest["shards"]]

    def resume(self) -> None:
        """Sweep dead writers' temp files, adopt whole shards the manifest misses, and read which
        sources and hashes the shards hold (for :meth:`done` and duplicate detection)."""
        pq = require("pyarrow.parquet", "archive")
        shards_dir = self.root / SHARDS
        shards_dir.mkdir(exist_ok=True)
        listed = {s["file"] for s in self.manifest["shards"]}
        for p in sorted(shards_dir.iterdir()):
            if (m := _TMP_RE.match(p.name)) and not pid_alive(int(m.group(1))):
                p.unlink()
            elif SHARD_RE.match(p.name) and p.name not in listed:
                entry = self._describe(p)
                log.info("archive: adopting %s (written before the last run stopped)", p.name)
                self.manifest["shards"].append(entry)
        self.manifest["shards"].sort(key=lambda s: s["file"])
        for p in self.shard_paths():
            try:
                t = pq.read_table(p, columns=["hash", "source"])
                footer = _footer(pq.read_schema(p))
            except (OSError, ValueError) as exc:
                raise InputError(
                    f"archive shard {p} can't be read ({exc}); delete it and run again"
                ) from None
            self.hashes.update(t.column("hash").to_pylist())
            self.done.update(s for s in t.column("source").to_pylist() if s)
            self.done.update(src for src, _ in footer.get("duplicates", []))
            self.done.update(src for src, _ in footer.get("failed", []))
        self._write_manifest()

    def _describe(self, p: Path) -> dict:
        pq = require("pyarrow.parquet", "archive")
        try:
            meta = pq.read_metadata(p)
            footer = _footer(meta.schema.to_arrow_schema())
        except (OSError, ValueError) as exc:
            raise InputError(f"archive shard {p} can't be read ({exc}); delete it and run again") from None
        if footer.get("fingerprint") != self.fingerprint:
            raise InputError(
                f"archive shard {p} belongs to encoder {footer.get('fingerprint')}, not {self.fingerprint}"
            )
        return _entry(p, meta.num_rows, footer)

    def next_number(self) -> int:
        nums = [int(SHARD_RE.match(s["file"]).group(1)) for s in self.manifest["shards"]]
        return max(nums, default=-1) + 1

    def write_shard(
        self, number: int, rows: list[dict], *, duplicates: list, failed: list, inputs: int
    ) -> dict:
        """Write one shard (rows: hash, source, format, width, height, metadata, embedding) and
        list it in the manifest. Returns its manifest entry."""
        pa = require("pyarrow", "archive")
        pq = require("pyarrow.parquet", "archive")
        name = f"shard-{number:06d}.parquet"
        path = self.root / SHARDS / name
        footer = {
            "fingerprint": self.fingerprint,
            "inputs": inputs,
            "duplicates": duplicates,
            "failed": failed,
        }
        emb = np.asarray([r["embedding"] for r in rows], dtype=np.float32).reshape(len(rows), self.dim)
        cols = {k: [r[k] for r in rows] for k in ("hash", "source", "format", "width", "height")}
        cols["metadata"] = [sorted(r["metadata"].items()) for r in rows]
        sch = schema(self.dim, footer)
        arrays = [pa.array(cols[f.name], type=f.type) for f in sch if f.name != "embedding"]
        arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), self.dim))
        table = pa.Table.from_arrays(arrays, schema=sch)
        tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
        try:
            pq.write_table(table, tmp, compression="zstd")
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        entry = _entry(path, len(rows), footer)
        self.manifest["shards"].append(entry)
        self.hashes.update(cols["hash"])
        self.done.update(s for s in cols["source"] if s)
        self.done.update(src for src, _ in duplicates + failed)
        self._write_manifest()
        return entry

    def _write_manifest(self) -> None:
        m = self.manifest
        m["cases"] = sum(s["rows"] for s in m["shards"])
        m["inputs"] = sum(s["inputs"] for s in m["shards"])
        m["updated"] = _now()
        write_json_atomic(self.root / MANIFEST, m)

    def verify(self) -> None:
        """Every shard the manifest lists is there with its size and sha256 (InputError naming it)."""
        for s, p in zip(self.manifest["shards"], self.shard_paths(), strict=True):
            if not p.is_file() or p.stat().st_size != s["bytes"] or sha256_file(p) != s["sha256"]:
                raise InputError(
                    f"archive shard {p} is missing or does not match the manifest; index it again"
                )


def _entry(path: Path, rows: int, footer: dict) -> dict:
    return {
        "file": path.name,
        "rows": rows,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "inputs": int(footer.get("inputs", rows)),
        "duplicates": len(footer.get("duplicates", [])),
        "failed": len(footer.get("failed", [])),
    }


def _footer(arrow_schema) -> dict:
    raw = (arrow_schema.metadata or {}).get(FOOTER_KEY)
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {}
