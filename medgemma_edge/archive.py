"""``medgemma-edge archive``: index a hospital archive on Ray Data into Parquet shards.

```
medgemma-edge archive index SRC... --out DIR -b BUNDLE [--precision P] [--ray-address ADDR]
                      [--actors N] [--threads-per-actor N] [--batch N] [--shard-size N] [--json]
medgemma-edge archive info DIR [--json]
```

SRC: image folders and files, CSV manifests (a ``path`` column + metadata columns), study stores.
Re-running the same command resumes: only the inputs no shard holds yet are embedded. The device
then takes the shards with ``medgemma-edge index -b BUNDLE --index DIR import-archive OUT``.
Needs the ``archive`` extra (ray[data], pyarrow); the work is in :mod:`export.archive`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge.errors import UsageError
from medgemma_edge import progress
from medgemma_edge.common import default_bundle, emit_json


def add_archive_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "archive", help="embed an image archive on Ray into Parquet shards (for import-archive)"
    )
    acts = p.add_subparsers(dest="action", metavar="ACTION")
    acts.required = True
    i = acts.add_parser("index", help="embed folders / CSV manifests / study stores; re-run to resume")
    i.add_argument("sources", nargs="+", type=Path, metavar="SRC")
    i.add_argument("--out", type=Path, required=True, help="the archive directory (shards + manifest.json)")
    i.add_argument(
        "-b", "--bundle", default=default_bundle(), help="bundle directory ($MEDGEMMA_EDGE_BUNDLE)"
    )
    i.add_argument("--precision", help="tower precision: int8, fp16, fp32 (default: the bundle's)")
    i.add_argument("--ray-address", help="join this Ray cluster (ray start --head ...); default: a local Ray")
    i.add_argument("--actors", type=int, default=1, help="embedding actors, one onnxruntime session each")
    i.add_argument(
        "--threads-per-actor", type=int, help="onnxruntime threads per actor (default: cores/actors)"
    )
    i.add_argument("--batch", type=int, default=16, help="images per Ray batch (default 16)")
    i.add_argument("--shard-size", type=int, default=256, help="inputs per Parquet shard (default 256)")
    i.add_argument("--json", action="store_true", help="print one JSON report")
    n = acts.add_parser("info", help="encoder, shard and case counts of an archive directory")
    n.add_argument("dir", type=Path)
    n.add_argument("--json", action="store_true")
    p.set_defaults(func=run_archive)


def run_archive(args: argparse.Namespace) -> int:
    return {"index": _index, "info": _info}[args.action](args)


def _index(args) -> int:
    from export.archive.pipeline import index_archive

    if not args.bundle:
        raise UsageError("give a bundle with -b/--bundle or set MEDGEMMA_EDGE_BUNDLE")
    if not args.verbose:
        _quiet_ray()
    with progress.bar("archiving", unit="img", enabled=not args.json) as cb:
        rep = index_archive(
            args.sources,
            out=args.out,
            bundle=args.bundle,
            precision=args.precision,
            ray_address=args.ray_address,
            actors=args.actors,
            threads_per_actor=args.threads_per_actor,
            batch=args.batch,
            shard_size=args.shard_size,
            progress=cb,
        )
    if args.json:
        emit_json({"ok": True, **rep.to_json()})
        return 0
    for path, err in rep.failed:
        print(f"skipped {path}: {err}", file=sys.stderr)
    print(
        f"{rep.added} images embedded into {rep.shards_written} new shards ({rep.already} inputs already done, "
        f"{rep.duplicates} duplicates, {len(rep.failed)} unreadable); archive {args.out} holds {rep.cases} "
        f"cases ({rep.images_per_s:.1f} images/s, {rep.actors} actors)"
    )
    return 0


def _quiet_ray() -> None:
    """Ray Data logs every stage's progress at INFO on stderr: only warnings, unless -v."""
    import logging

    try:
        import ray.data  # noqa: F401 (it sets up its loggers on import; lower them after)
    except ImportError:
        return  # index_archive names the extra to install
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _info(args) -> int:
    from export.archive.shards import Archive

    m = Archive.open(args.dir).manifest
    facts = {k: v for k, v in m.items() if k != "shards"} | {"shard_files": len(m["shards"])}
    if args.json:
        emit_json({"ok": True, **facts})
    else:
        for k, v in facts.items():
            print(f"{k:<12} {v}")
    return 0
