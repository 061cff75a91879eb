"""``archive index``: embed an archive of images on Ray Data into Parquet shards (resumable).

```
inputs (driver)  ->  read + sha256 + decode + preprocess (Ray tasks)  ->  embed (actor pool:
one onnxruntime session per actor, ``threads_per_actor`` intra-op threads, CUDA when the actor
was given a GPU)  ->  driver: skip duplicates by content hash, write each shard once all its
inputs are back (shards.py: temp + fsync + rename, then the manifest)
```

Inputs not handled by a shard already on disk are cut into shards of ``shard_size`` in listing
order; a killed run, started again, lists the inputs again and writes shards for the rest only.
Preprocessing is the runtime's own (:func:`edge.media.images.load_image`, the bundle's
``preprocess.json``) and embedding goes through :class:`edge.medsiglip.model.MedSigLIP` at its
default vision batch, so a shard's embedding of an image is the one ``index add`` would store.

Locally (no ``ray_address``) it starts its own Ray with this machine's cores and shuts it down
after; with ``ray_address`` it joins a running cluster (``ray start --head``; docs/ARCHIVE.md).
Every worker needs this package installed and the input paths visible at the same place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.bundle.atomic import hold_lock
from edge.errors import EdgeError, InputError, UsageError, require
from export.archive.inputs import Item, list_inputs
from export.archive.shards import Archive, Encoding

log = logging.getLogger(__name__)

SHARD_SIZE = 256  # inputs per shard
BATCH = 16  # images per Ray batch (per task and per actor call)


@dataclass
class ArchiveReport:
    """What one :func:`index_archive` run did."""

    out: str
    inputs: int = 0  # listed
    already: int = 0  # handled by shards of an earlier run
    shards_written: int = 0
    added: int = 0  # rows written by this run
    duplicates: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    cases: int = 0  # rows in the archive afterwards
    seconds: float = 0.0
    actors: int = 0
    fingerprint: str = ""

    @property
    def images_per_s(self) -> float:
        return self.added / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict:
        return {
            **{k: v for k, v in vars(self).items() if k != "failed"},
            "failed": [{"path": p, "error": e} for p, e in self.failed],
            "images_per_s": self.images_per_s,
        }


# --- the Ray stages (module level: pickled by reference, imported on the workers) --------------------

_SPECS: dict[str, object] = {}  # bundle path -> ImageSpec, per worker process


def prepare_batch(batch: dict, *, bundle: str) -> dict:
    """Ray task: read, hash, decode and preprocess a batch of inputs (columns shard, source,
    meta). A failure is a row with status "failed" and its reason (zeros for pixels)."""
    from edge.files import read_bytes
    from edge.media.images import MAX_FILE_BYTES, load_image
    from edge.medsiglip.onnx_towers import load_preprocessing
    from edge.medsiglip.preprocess import image_to_pixels

    if bundle not in _SPECS:
        _SPECS[bundle] = load_preprocessing(bundle)[0]
    spec = _SPECS[bundle]
    n = len(batch["source"])
    out = {k: [] for k in ("hash", "status", "reason", "format", "width", "height", "meta")}
    pixels = np.zeros((n, 3, spec.height, spec.width), dtype=np.float32)
    for i in range(n):
        src, meta = str(batch["source"][i]), json.loads(str(batch["meta"][i]))
        digest, status, reason, fmt, size = "", "ok", "", "", (0, 0)
        try:
            data = read_bytes(src, limit=MAX_FILE_BYTES, what="image")
            digest = hashlib.sha256(data).hexdigest()
            loaded = load_image(data)
            pixels[i] = image_to_pixels(loaded.image, spec)
            fmt, size = loaded.format, loaded.source_size
            meta = {
                "format": loaded.format,
                **({"modality": m} if (m := loaded.info.get("modality")) else {}),
                **meta,
            }
        except EdgeError as exc:  # unreadable, not an image, too large, DICOM without a decoder
            msg = str(exc)
            status, reason = "failed", (Path(src).name + msg[5:] if msg.startswith("image") else msg)
        for k, v in (("hash", digest), ("status", status), ("reason", reason), ("format", fmt)):
            out[k].append(v)
        out["width"].append(int(size[0]))
        out["height"].append(int(size[1]))
        out["meta"].append(json.dumps(meta))
    return {
        "shard": np.asarray(batch["shard"], dtype=np.int64),
        "source": np.asarray(batch["source"], dtype=object),
        **{k: np.asarray(v, dtype=object) for k, v in out.items() if k not in ("width", "height")},
        "width": np.asarray(out["width"], dtype=np.int32),
        "height": np.asarray(out["height"], dtype=np.int32),
        "pixels": pixels,
    }


class Embedder:
    """Ray actor: one MedSigLIP vision session (``threads`` intra-op threads; CUDA if this actor
    holds a GPU and onnxruntime has the provider)."""

    def __init__(self, bundle: str, precision: str, threads: int | None, fingerprint: str):
        import ray

        gpu = bool(ray.get_gpu_ids())
        self.encoder = open_encoder(bundle, precision=precision, threads=threads, gpu=gpu)
        if self.encoder.fingerprint != fingerprint:  # a worker with another copy of the bundle
            raise InputError(
                f"worker's bundle {bundle} has encoder {self.encoder.fingerprint}, the driver's {fingerprint}"
            )

    def __call__(self, batch: dict) -> dict:
        ok = np.flatnonzero(batch["status"] == "ok")
        emb = np.zeros((len(batch["status"]), self.encoder.dim), dtype=np.float32)
        if len(ok):
            emb[ok] = self.encoder.embed_pixels(np.ascontiguousarray(batch["pixels"][ok]))  # [n, D]
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["embedding"] = emb
        return out


def open_encoder(bundle, *, precision: str | None, threads: int | None, gpu: bool = False):
    """The bundle's MedSigLIP vision tower for one worker (CUDA when ``gpu`` and supported)."""
    import dataclasses

    from edge.medsiglip.model import MedSigLIP
    from edge.medsiglip.settings import MedSigLIPSettings

    extra = {}
    if gpu:
        if "gpu" in {f.name for f in dataclasses.fields(MedSigLIPSettings)}:
            extra["gpu"] = True
        else:
            log.warning("archive: this worker has a GPU but this MedSigLIP build runs on the CPU only")
    return MedSigLIP(bundle, precision=precision, threads=threads, towers=("vision",), **extra)


# --- the driver --------------------------------------------------------------------------------------


def index_archive(
    sources: Iterable[str | os.PathLike],
    *,
    out: str | os.PathLike,
    bundle: str | os.PathLike,
    precision: str | None = None,
    ray_address: str | None = None,
    actors: int = 1,
    threads_per_actor: int | None = None,
    batch: int = BATCH,
    shard_size: int = SHARD_SIZE,
    progress: Callable[[int, int], None] | None = None,
) -> ArchiveReport:
    """Embed every image ``sources`` name into Parquet shards under ``out`` (resumable).

    Args:
        sources: folders, image files, CSV manifests, study stores (:mod:`export.archive.inputs`).
        out: the archive directory (created; an existing one must hold this encoder's shards).
        bundle / precision: the MedSigLIP bundle and tower precision (default: the bundle's).
        ray_address: a running Ray cluster to join (``ray start --head``); None starts a local one.
        actors: embedding actors (one onnxruntime session each).
        threads_per_actor: onnxruntime intra-op threads per actor (default: cores / actors).
        batch: images per Ray batch; shard_size: inputs per shard.
        progress: ``progress(inputs done, inputs total)`` after each shard is written.
    Raises:
        InputError: a missing source, another encoder's archive, a damaged shard.
        UsageError: a bad count, or another run is writing ``out``.
    """
    for name, v in (("actors", actors), ("batch", batch), ("shard size", shard_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UsageError(f"{name} must be a whole number of at least 1 (got {v})")
    if threads_per_actor is not None and threads_per_actor < 1:
        raise UsageError(f"threads per actor must be at least 1 (got {threads_per_actor})")
    ray = require("ray", "archive")
    require("ray.data", "archive")
    require("pyarrow", "archive")
    t0 = time.perf_counter()
    out, bundle = Path(out), str(Path(bundle).resolve())
    from edge.medsiglip.model import MedSigLIP

    # the driver needs only the encoder's fingerprint: with the text tower alone (opened on
    # first use, never here) no onnxruntime session is loaded; the actors open their own
    encoding = Encoding.of(MedSigLIP(bundle, precision=precision, towers=("text",)))
    skipped: list[tuple[str, str]] = []
    items = list_inputs(sources, skipped=skipped)
    out.parent.mkdir(parents=True, exist_ok=True)
    with hold_lock(out, busy=f"another `archive index` is writing {out}; wait for it to finish"):
        arch = Archive.open(out, encoding=encoding, create=True)
        arch.resume()
        todo = [it for it in items if it.source not in arch.done]
        rep = ArchiveReport(str(out), inputs=len(items), already=len(items) - len(todo), failed=skipped)
        rep.fingerprint = encoding.fingerprint
        log.info(
            "archive %s: %d inputs, %d already in shards, %d to do",
            out.name,
            len(items),
            rep.already,
            len(todo),
        )
        if todo:
            started = not ray.is_initialized()
            if started:
                _start_ray(ray, ray_address)
            try:
                _run(
                    ray,
                    arch,
                    todo,
                    rep,
                    bundle,
                    encoding,
                    actors,
                    threads_per_actor,
                    batch,
                    shard_size,
                    progress,
                )
            finally:
                if started:
                    ray.shutdown()
        rep.cases = arch.manifest["cases"]
    rep.seconds = time.perf_counter() - t0
    log.info(
        "archive %s: %d shards, %d added, %d duplicates, %d failed in %.1fs",
        *(out.name, rep.shards_written, rep.added, rep.duplicates, len(rep.failed), rep.seconds),
    )
    return rep


def _worker_error(exc: BaseException) -> EdgeError:
    """The library error a Ray failure carries (a worker's InputError, say), else one line."""
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        if isinstance(e, EdgeError):
            return e
        seen.add(id(e))
        e = getattr(e, "cause", None) or e.__cause__
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    return EdgeError(
        f"the archive run failed on a Ray worker ({first}); finished shards are kept, run it again"
    )


def _start_ray(ray, address: str | None) -> None:
    opts = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address:
        try:
            ray.init(address=address, **opts)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise InputError(
                f"can't join the Ray cluster at {address} ({first}); start it with `ray start --head` "
                "(docs/ARCHIVE.md) or leave out --ray-address to run locally"
            ) from None
    else:
        ray.init(num_cpus=os.cpu_count() or 1, **opts)


def _run(ray, arch, todo: list[Item], rep, bundle, encoding, actors, threads, batch, shard_size, progress):
    """Plan shards, run the dataset, write each shard when all its inputs are back."""
    first = arch.next_number()
    plan = [todo[i : i + shard_size] for i in range(0, len(todo), shard_size)]
    expect = {first + j: len(chunk) for j, chunk in enumerate(plan)}
    rows = [
        {"shard": first + j, "source": it.source, "meta": json.dumps(it.meta)}
        for j, chunk in enumerate(plan)
        for it in chunk
    ]
    cpus = float(ray.cluster_resources().get("CPU", 1))
    gpus = float(ray.cluster_resources().get("GPU", 0))
    threads = threads or max(1, int(cpus // actors))
    # leave the read tasks room: an actor's logical CPUs never take the whole cluster
    actor_cpus = min(float(threads), max(0.25, (cpus - 0.5) / actors))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch, 4 * len(plan))))
    ds = ds.map_batches(prepare_batch, batch_size=batch, fn_kwargs={"bundle": bundle}, num_cpus=0.5)
    ds = ds.map_batches(
        Embedder,
        batch_size=batch,
        compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={
            "bundle": bundle,
            "precision": encoding.precision,
            "threads": threads,
            "fingerprint": encoding.fingerprint,
        },
        num_cpus=actor_cpus,
        num_gpus=min(1.0, gpus / actors) if gpus else None,
    )
    rep.actors = actors
    pending: dict[int, list[dict]] = {s: [] for s in expect}
    done_inputs = 0
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(b["source"])):
            s = int(b["shard"][i])
            pending[s].append({k: b[k][i] for k in b})
            if len(pending[s]) == expect[s]:
                done_inputs += expect[s]
                _write(arch, s, pending.pop(s), rep)
                if progress:
                    progress(rep.already + done_inputs, rep.inputs)


def _write(arch: Archive, number: int, got: list[dict], rep: ArchiveReport) -> None:
    rows, dups, failed = [], [], []
    for r in sorted(got, key=lambda r: str(r["source"])):
        src = str(r["source"])
        if r["status"] != "ok":
            failed.append([src, str(r["reason"])])
        elif r["hash"] in arch.hashes or any(x["hash"] == r["hash"] for x in rows):
            dups.append([src, str(r["hash"])])
        else:
            rows.append(
                {
                    "hash": str(r["hash"]),
                    "source": src,
                    "format": str(r["format"]),
                    "width": int(r["width"]),
                    "height": int(r["height"]),
                    "metadata": json.loads(str(r["meta"])),
                    "embedding": np.asarray(r["embedding"], dtype=np.float32),
                }
            )
    arch.write_shard(number, rows, duplicates=dups, failed=failed, inputs=len(got))
    rep.shards_written += 1
    rep.added += len(rows)
    rep.duplicates += len(dups)
    rep.failed += [(s, e) for s, e in failed]
