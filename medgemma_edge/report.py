"""``medgemma-edge report``: saved, clinician-signed reports, their exports and their delivery.

```
medgemma-edge report list [--data DIR] [--study UID] [--status draft|signed] [--json]
medgemma-edge report show REPORT_ID [--version N] [--data DIR] [--json]      (with the audit log)
medgemma-edge report export REPORT_ID [--version N] --format sr|fhir|pdf --out FILE [--force]
                            [--image FILE] [--data DIR]
medgemma-edge report send REPORT_ID [--version N] (--pacs HOST:PORT[/AE] | --fhir URL) [--data DIR] [--json]
medgemma-edge report outbox [--data DIR] [--json]
```

Reports live in ``DIR/reports`` and received studies in ``DIR/studies`` (``--data`` default: the
runtime's data directory, ``$MEDGEMMA_EDGE_DATA``). ``send`` queues the signed version and makes
one delivery attempt at once; what fails stays queued for ``serve``'s outbox to retry.
Only parsing and printing here: the work is in :mod:`edge.reports`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import secrets
from pathlib import Path

from edge.errors import UsageError
from medgemma_edge.common import check_range, emit_json


def _data(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", type=Path, default=None, help="the runtime's data directory ($MEDGEMMA_EDGE_DATA)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="saved reports: list, show, export (SR, FHIR, PDF), send, outbox")
    acts = p.add_subparsers(dest="action", metavar="ACTION")
    acts.required = True
    a = acts.add_parser("list", help="saved reports, most recently changed first")
    a.add_argument("--study", help="only reports on this Study Instance UID")
    a.add_argument("--status", choices=("draft", "signed"), help="only drafts or only signed reports")
    a.add_argument("--limit", type=int, default=50, help="at most this many (1-200, default 50)")
    _data(a)
    s = acts.add_parser("show", help="one report version with its audit log")
    s.add_argument("report_id", metavar="REPORT_ID")
    s.add_argument("--version", type=int, help="which version (default: the latest)")
    _data(s)
    e = acts.add_parser("export", help="write a signed report as a DICOM SR, FHIR R4 JSON or a PDF")
    e.add_argument("report_id", metavar="REPORT_ID")
    e.add_argument("--version", type=int, help="which version (default: the latest)")
    e.add_argument("--format", required=True, choices=("sr", "fhir", "pdf"))
    e.add_argument("--out", type=Path, required=True, metavar="FILE")
    e.add_argument("--force", action="store_true", help="replace FILE if it exists")
    e.add_argument(
        "--image", type=Path, help="the uploaded image the report is on (its thumbnail in the PDF)"
    )
    _data(e)
    d = acts.add_parser("send", help="queue a signed report for a PACS or a FHIR endpoint and try once")
    d.add_argument("report_id", metavar="REPORT_ID")
    d.add_argument("--version", type=int, help="which version (default: the latest)")
    g = d.add_mutually_exclusive_group(required=True)
    g.add_argument("--pacs", metavar="HOST:PORT[/AE]", help="C-STORE the DICOM SR to this PACS")
    g.add_argument("--fhir", metavar="URL", help="POST the FHIR Bundle to this http(s) URL")
    d.add_argument("--ae-title", default="MEDGEMMA", help="this device's calling AE title (default MEDGEMMA)")
    _data(d)
    o = acts.add_parser("outbox", help="the delivery queue: queued, delivered and failed items")
    _data(o)
    p.set_defaults(func=run_report)


def _open(args):
    from edge.files import data_dir
    from edge.reports.store import ReportStore

    root = args.data or data_dir()
    studies = None
    if (root / "studies").is_dir():
        from edge.studies.store import StudyStore

        studies = StudyStore(root / "studies")
    return ReportStore(root / "reports"), studies


def write_out(path: Path, data: bytes, *, force: bool) -> None:
    """``data`` to ``path`` through a temp file + fsync; an existing file is kept unless ``force``."""
    if path.is_dir():
        raise UsageError(f"--out {path} is a directory: name the file to write")
    if path.exists() and not force:
        raise UsageError(f"{path} exists: choose another --out or pass --force to replace it")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if another writer created it meanwhile: never overwritten
            except FileExistsError:
                raise UsageError(
                    f"{path} exists: choose another --out or pass --force to replace it"
                ) from None
    except FileNotFoundError:
        raise UsageError(f"can't write {path}: its folder does not exist") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _line(r: dict) -> str:
    who = (
        f"signed by {r['signer']['name']} ({r['signer']['role']}) {r['signed_at']}"
        if r["signer"]
        else "draft"
    )
    src = r["source"].get("study_uid") or f"image {r['source'].get('image_sha256', '')[:12]}"
    sent = ", ".join(f"{i['destination']['kind']}:{i['state']}" for i in r["delivery"]) or "not sent"
    return f"{r['report_id']}  v{r['version']}  {who}  [{src}]  {sent}\n    {r['final']['impression'][:100]}"


def _item_line(i: dict) -> str:
    from edge.reports.outbox import describe

    when = i["delivered_at"] or (f"next {i['next_attempt']}" if i["state"] == "queued" else "")
    err = f"  last error: {i['last_error']}" if i["last_error"] else ""
    return (
        f"#{i['item_id']}  {i['report_id']} v{i['version']}  {describe(i['destination'])}  {i['state']}"
        f"  attempts {i['attempts']}  {when}{err}"
    )


def run_report(args: argparse.Namespace) -> int:
    store, studies = _open(args)
    try:
        return _ACTIONS[args.action](args, store, studies)
    finally:
        store.close()
        if studies is not None:
            studies.close()


def _list(args, store, studies) -> int:
    check_range("--limit", args.limit, 1, 200)
    res = store.list(study_uid=args.study, status=args.status, limit=args.limit)
    if args.json:
        emit_json({"ok": True, **res})
        return 0
    for r in res["reports"]:
        print(_line(r))
    print(f"{len(res['reports'])} of {res['total']} report(s)")
    return 0


def _show(args, store, studies) -> int:
    report = store.get(args.report_id, args.version)
    audit = store.audit(args.report_id)
    if args.json:
        emit_json({"ok": True, **report, "audit": audit})
        return 0
    print(_line(report))
    for a in audit:
        print(f"  {a['time']}  v{a['version']}  {a['action']:<7} {a['actor'] or ''}  {a['detail'] or ''}")
    return 0


def _export(args, store, studies) -> int:
    from edge.reports.exports import export_report

    image = None
    if args.image is not None:
        from edge.files import read_bytes
        from edge.media.images import load_image

        data = read_bytes(args.image, limit=512 << 20, what="image")
        want = store.get(args.report_id, args.version)["source"].get("image_sha256")
        if hashlib.sha256(data).hexdigest() != want:
            raise UsageError(f"{args.image} is not the image this report is on (its sha256 differs)")
        image = load_image(data)
    out = export_report(
        store, args.report_id, args.format, version=args.version, studies=studies, image=image
    )
    write_out(args.out, out.data, force=args.force)
    if args.json:
        emit_json(
            {
                "ok": True,
                "format": out.format,
                "mime": out.mime,
                "path": str(args.out),
                "bytes": len(out.data),
            }
        )
    else:
        print(f"wrote {args.out} ({out.mime}, {len(out.data)} bytes)")
    return 0


def _send(args, store, studies) -> int:
    from android_bridge.delivery import DeliverySettings, make_senders, parse_pacs
    from edge.reports.outbox import Outbox, check_destination

    dest = parse_pacs(args.pacs) if args.pacs else check_destination({"kind": "fhir", "url": args.fhir})
    version = store.get(args.report_id, args.version)["version"]
    outbox = Outbox(store)
    item = outbox.queue(args.report_id, version, dest, actor="cli")
    if item["state"] == "queued":
        senders = make_senders(store, studies, DeliverySettings(calling_ae_title=args.ae_title))
        outbox.retry_now(item["item_id"])
        outbox.deliver_due(senders, only={item["item_id"]})
        item = outbox.get(item["item_id"])
    if args.json:
        emit_json({"ok": True, **item})
    else:
        print(_item_line(item))
    return 0


def _outbox(args, store, studies) -> int:
    from edge.reports.outbox import Outbox

    items = Outbox(store).list()
    if args.json:
        emit_json({"ok": True, "items": items})
        return 0
    for i in items:
        print(_item_line(i))
    print(f"{len(items)} item(s)")
    return 0


_ACTIONS = {"list": _list, "show": _show, "export": _export, "send": _send, "outbox": _outbox}
