"""``medgemma-edge classify | index | search``: MedSigLIP zero-shot and the similar-case index.

```
medgemma-edge classify -b B IMAGE [--labels "a,b,c" | --label-set cxr] [--json]
medgemma-edge index -b B --index DIR add FILE_OR_DIR... [--meta key=value]... [--copy]
medgemma-edge index --index DIR export OUT.tar
medgemma-edge index -b B --index DIR import IN.tar
medgemma-edge index -b B --index DIR import-archive ARCHIVE_DIR   (shards of `archive index`)
medgemma-edge index --index DIR info
medgemma-edge index -b B --index DIR repair      (a damaged database: re-index what it records)
medgemma-edge search -b B --index DIR (IMAGE | --text "query") [--k 5] [--where key=value]... [--json]
```

Only parsing and printing here; the work is in :mod:`edge.medsiglip.model`, :mod:`edge.cases.index`,
:mod:`edge.cases.repair` and :mod:`edge.cases.transfer`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge.errors import InputError, UsageError
from medgemma_edge import progress
from medgemma_edge.common import default_bundle, emit_json

NOTE_TWIN = "(synthetic twin bundle: random weights, the scores mean nothing)"


def _encoder_options(p: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    p.add_argument(
        "-b", "--bundle", default=d(default_bundle()), help="bundle directory ($MEDGEMMA_EDGE_BUNDLE)"
    )
    p.add_argument(
        "--precision",
        default=d(None),
        help="tower precision: int8, fp16, fp32 (default: the bundle's, or the index's)",
    )
    p.add_argument("--threads", type=int, default=d(None), help="onnxruntime threads (default: all cores)")


def _index_option(p: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    p.add_argument(
        "--index", type=Path, default=argparse.SUPPRESS if suppress else None, help="the case index directory"
    )


def _encoder(args, *, towers=("vision", "text"), precision: str | None = None):
    from edge.medsiglip.model import MedSigLIP

    if not args.bundle:
        raise UsageError("give a bundle with -b/--bundle or set MEDGEMMA_EDGE_BUNDLE")
    return MedSigLIP(args.bundle, precision=args.precision or precision, threads=args.threads, towers=towers)


def _index_precision(root: Path | None, *, damaged_ok: bool = False) -> str | None:
    """The precision an existing index was built with (so --precision can be left out);
    ``damaged_ok``: read it from what a damaged database still holds (for repair)."""
    from edge.cases.index import DB_NAME, CaseIndex

    if root is None or not (root / DB_NAME).is_file():
        return None
    if damaged_ok:
        from edge.cases.repair import salvage

        return salvage(root / DB_NAME).info.get("precision")
    with CaseIndex.open(root) as idx:
        return idx.info.get("precision")


def _need_index(args) -> Path:
    if args.index is None:
        raise UsageError("give the index directory with --index DIR")
    return args.index


# --- classify ----------------------------------------------------------------------------------


def add_classify_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="zero-shot MedSigLIP scores of an image against finding labels")
    p.add_argument("image", type=Path, help="PNG, JPEG or DICOM file")
    _encoder_options(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--labels", help='comma-separated labels, embedded with the text tower: "a,b,c"')
    g.add_argument("--label-set", help="a label set stored in the bundle (cxr, derm); default cxr")
    p.add_argument("--frame", type=int, help="which frame of a multi-frame DICOM (default: the middle one)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_classify)


def run_classify(args: argparse.Namespace) -> int:
    from edge.media.images import load_image

    labels = None
    if args.labels is not None:
        labels = [s.strip() for s in args.labels.split(",") if s.strip()]
        if not labels:
            raise UsageError('--labels needs at least one label, e.g. --labels "pneumothorax,normal"')
    enc = _encoder(args, towers=("vision", "text") if labels else ("vision",))
    res = enc.classify(load_image(args.image, frame=args.frame), labels=labels, label_set=args.label_set)
    if args.json:
        emit_json({"ok": True, **res.to_json(), "synthetic": enc.bundle.synthetic})
        return 0
    print(f"zero-shot: {res.label_set or 'your labels'} via {res.embeddings}, {res.seconds:.2f}s")
    print(f"{'rank':>4}  {'label':<28} {'score':>7} {'logit':>8}")
    for i, r in enumerate(res.ranked, 1):
        print(f"{i:>4}  {r.label:<28} {r.score:>7.3f} {r.logit:>+8.2f}")
    print(res.note + (f" {NOTE_TWIN}" if enc.bundle.synthetic else ""))
    return 0


# --- index -------------------------------------------------------------------------------------


def add_index_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index", help="build, inspect and move a similar-case index (add, info, export, import)"
    )
    _encoder_options(p)
    _index_option(p)
    acts = p.add_subparsers(dest="action", metavar="ACTION")
    acts.required = True
    a = acts.add_parser("add", help="index image files and folders (recursive); re-run to resume")
    a.add_argument("paths", nargs="+", type=Path, metavar="FILE_OR_DIR")
    a.add_argument(
        "--meta", action="append", default=[], metavar="KEY=VALUE", help="metadata for every case added"
    )
    a.add_argument("--copy", action="store_true", help="keep a copy of each image inside the index")
    a.add_argument("--batch-size", type=int, default=16, help="images per transaction (default 16)")
    a.add_argument("--json", action="store_true", help="print one JSON report")
    i = acts.add_parser("info", help="count, encoder and metadata keys of an index (and whether it is whole)")
    i.add_argument("--json", action="store_true")
    r = acts.add_parser(
        "repair", help="rebuild a damaged index from the image paths and copies it records (ids renumbered)"
    )
    r.add_argument("--json", action="store_true")
    e = acts.add_parser("export", help="write the index to one .tar (ids, metadata, copies kept)")
    e.add_argument("out", type=Path, metavar="OUT.tar")
    e.add_argument("--json", action="store_true")
    m = acts.add_parser("import", help="unpack an exported .tar into a new --index directory")
    m.add_argument("archive", type=Path, metavar="IN.tar")
    m.add_argument("--json", action="store_true")
    ia = acts.add_parser(
        "import-archive",
        help="add the Parquet shards of `medgemma-edge archive index` (builds the ANN graph)",
    )
    ia.add_argument("archive", type=Path, metavar="ARCHIVE_DIR")
    ia.add_argument("--json", action="store_true")
    for q in (a, i, r, e, m, ia):  # also accept the shared options after the action
        _encoder_options(q, suppress=True)
        _index_option(q, suppress=True)
    p.set_defaults(func=run_index)


def run_index(args: argparse.Namespace) -> int:
    verbs = {
        "add": _index_add,
        "info": _index_info,
        "repair": _index_repair,
        "export": _index_export,
        "import": _index_import,
        "import-archive": _index_import_archive,
    }
    return verbs[args.action](args)


def _index_add(args) -> int:
    from edge.cases.index import CaseIndex, parse_pairs

    root = _need_index(args)
    meta = parse_pairs(args.meta)
    enc = _encoder(args, towers=("vision",), precision=_index_precision(root))
    with CaseIndex.open(root, encoder=enc, create=True) as idx:
        with progress.bar("indexing", unit="img", enabled=not args.json) as cb:
            rep = idx.add(
                args.paths, encoder=enc, meta=meta, copy=args.copy, batch_size=args.batch_size, progress=cb
            )
    if args.json:
        emit_json({"ok": True, **rep.to_json()})
    else:
        for path, err in rep.failed:
            print(f"skipped {path}: {err}", file=sys.stderr)
        print(
            f"added {rep.added}, skipped {rep.duplicates} already indexed, {len(rep.failed)} unreadable; "
            f"index has {rep.total} cases ({rep.images_per_s:.1f} images/s)"
        )
    if rep.failed and rep.added == 0 and rep.duplicates == 0:
        return InputError.exit_code  # nothing in what was given could be indexed
    return 0


def _index_info(args) -> int:
    from edge.cases.index import CaseIndex

    with CaseIndex.open(_need_index(args)) as idx:
        idx.check()  # a damaged database is reported (with the repair), not half-shown
        st = idx.stats()
    if args.json:
        emit_json({"ok": True, **st})
    else:
        for k, v in st.items():
            print(f"{k:<14} {v}")
    return 0


def _index_repair(args) -> int:
    from edge.cases.repair import repair_index

    root = _need_index(args)
    enc = _encoder(args, towers=("vision",), precision=_index_precision(root, damaged_ok=True))
    with progress.bar("re-indexing", unit="img", enabled=not args.json) as cb:
        rep = repair_index(root, encoder=enc, progress=cb)
    if args.json:
        emit_json({"ok": True, **rep.to_json()})
        return 0
    for path, err in rep.missing:
        print(f"not re-added {path}: {err}", file=sys.stderr)
    recorded = f" of {rep.recorded} recorded" if rep.recorded is not None else ""
    if rep.recorded is None or rep.readable < rep.recorded:
        print(
            "some cases could not be read from the damaged file: add their folders again with "
            f"`medgemma-edge index --index {root} add FOLDER` (what is indexed already is skipped)",
            file=sys.stderr,
        )
    print(
        f"repaired {root}: {rep.added} cases re-added ({rep.from_copies} from the index's copies), "
        f"{rep.readable} readable{recorded}, {len(rep.missing)} not found; index has {rep.total} cases "
        f"(ids renumbered); the damaged file is kept as {rep.damaged_kept}"
    )
    return 0


def _index_export(args) -> int:
    from edge.cases.transfer import export_index

    man = export_index(_need_index(args), args.out)
    if args.json:
        emit_json({"ok": True, "archive": str(args.out), **man})
    else:
        print(f"exported {man['cases']} cases ({len(man['files']) - 1} image copies) to {args.out}")
    return 0


def _index_import(args) -> int:
    from edge.cases.transfer import import_index

    fp = None
    if args.bundle:  # check the archive against this bundle at the precision it was built with
        fp = _encoder(args, towers=("vision",), precision=_archive_precision(args.archive)).fingerprint
    else:
        print("note: no bundle given, so the index's encoder was not checked against one", file=sys.stderr)
    man = import_index(args.archive, _need_index(args), fingerprint=fp)
    if args.json:
        emit_json({"ok": True, "index": str(args.index), **man})
    else:
        print(f"imported {man['cases']} cases into {args.index}")
    return 0


def _index_import_archive(args) -> int:
    from edge.files import read_json
    from export.archive.load import import_archive
    from export.archive.shards import MANIFEST

    root = _need_index(args)
    if not args.bundle:
        raise UsageError("give the bundle this device searches with (-b/--bundle): its encoder is checked")
    man = args.archive / MANIFEST
    built = read_json(man, what="archive manifest").get("precision") if man.is_file() else None
    enc = _encoder(args, towers=("vision",), precision=_index_precision(root) or built)
    with progress.bar("importing", unit="case", enabled=not args.json) as cb:
        rep = import_archive(args.archive, root, encoder=enc, progress=cb)
    if args.json:
        emit_json({"ok": True, **rep.to_json()})
    else:
        how = f"ANN ({rep.ann['dtype']}, {rep.ann['cases']} cases)" if rep.ann else "exact search"
        print(
            f"imported {rep.added} of {rep.rows} archived cases ({rep.already} already there); "
            f"index {root} has {rep.total} cases, searched by {how}"
        )
    return 0


def _archive_precision(archive: Path) -> str | None:
    from edge.cases.transfer import archive_manifest
    from edge.errors import InputError

    try:
        return archive_manifest(archive).get("precision")
    except InputError:
        return None  # import_index reports what is wrong with the archive


# --- search ------------------------------------------------------------------------------------


def add_search_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="find the most similar cases to an image or a text")
    p.add_argument("image", nargs="?", type=Path, help="PNG, JPEG or DICOM file (or use --text)")
    p.add_argument("--text", help="search by a text description instead of an image")
    _encoder_options(p)
    _index_option(p)
    p.add_argument("--k", "-k", type=int, default=5, help="how many cases (default 5)")
    p.add_argument(
        "--where", action="append", default=[], metavar="KEY=VALUE", help="metadata filter; repeat"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_search)


def run_search(args: argparse.Namespace) -> int:
    from edge.cases.index import CaseIndex, check_k, parse_pairs

    if (args.image is None) == (args.text is None):
        raise UsageError("give either an IMAGE or --text QUERY")
    check_k(args.k)
    where = parse_pairs(args.where, "--where")
    root = _need_index(args)
    towers = ("vision", "text") if args.text is not None else ("vision",)
    enc = _encoder(args, towers=towers, precision=_index_precision(root))
    with CaseIndex.open(root, encoder=enc) as idx:
        if args.text is not None:
            hits = idx.search_text(args.text, encoder=enc, k=args.k, where=where)
        else:
            hits = idx.search_image(args.image, encoder=enc, k=args.k, where=where)
        total = idx.count()
    if args.json:
        emit_json({"ok": True, "cases": total, "results": [h.to_json() for h in hits]})
        return 0
    print(f"{len(hits)} of {total} cases (cosine similarity of MedSigLIP embeddings; 1 = identical)")
    print(f"{'rank':>4} {'id':>6} {'score':>7}  {'metadata':<30} image")
    for i, h in enumerate(hits, 1):
        meta = ",".join(f"{k}={v}" for k, v in h.metadata.items())
        print(f"{i:>4} {h.id:>6} {h.score:>7.3f}  {meta:<30} {h.content}")
    return 0
