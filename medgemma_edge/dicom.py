"""``medgemma-edge dicom listen | import | list | check``: the DICOM node and the study store.

```
medgemma-edge dicom listen [--data DIR] [--host 127.0.0.1] [--port 11112] [--ae-title MEDGEMMA]
                           [--allow-ae AE]... [--allow-peer IP[/BITS]]...
medgemma-edge dicom import FOLDER [--data DIR] [--json]      (a USB stick from a CR reader, a CD)
medgemma-edge dicom list [--data DIR] [--modality CT] [--from DATE] [--to DATE] [--limit N] [--json]
medgemma-edge dicom check [--data DIR] [--quick] [--no-repair] [--json]
```

Studies live in ``DIR/studies`` (``DIR``: ``--data``, else ``$MEDGEMMA_EDGE_DATA``, else the XDG
data home). ``serve`` takes the same node flags through :func:`add_dicom_flags` (as
``--dicom-port`` / ``--dicom-host``; no port: no node) and builds the node with
:func:`node_from_args`. Only parsing and printing here; the work is in
:mod:`edge.studies.store` and :mod:`android_bridge.dicom_node`.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from edge.errors import InputError, UsageError
from medgemma_edge import progress
from medgemma_edge.common import emit_json, port_arg

DEFAULT_PORT = 11112
DEFAULT_AE = "MEDGEMMA"


def _ae(text: str) -> str:
    from android_bridge.dicom_node import check_ae_title

    try:
        return check_ae_title(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _peer(text: str) -> str:
    from android_bridge.dicom_node import parse_peers

    try:
        parse_peers([text])
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_data_flag(p: argparse.ArgumentParser) -> None:
    """``--data DIR``: the runtime data directory (studies in ``DIR/studies``)."""
    p.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        help="runtime data directory; studies are kept in DIR/studies "
        "(default: $MEDGEMMA_EDGE_DATA, else ~/.local/share/medgemma-edge)",
    )


def add_dicom_flags(p: argparse.ArgumentParser, *, listen: bool = False) -> None:
    """The DICOM node's flags, for ``dicom listen`` (``listen=True``: ``--port`` / ``--host``,
    default port 11112) and for ``serve`` (``--dicom-port`` / ``--dicom-host``; no port given:
    no node). Both spellings work for listen. Also adds ``--data`` (see :func:`add_data_flag`).

    Sets ``args.dicom_port``, ``args.dicom_host``, ``args.ae_title``, ``args.allow_ae``,
    ``args.allow_peer``, ``args.data``: what :func:`node_from_args` and :func:`open_store` read.
    """
    g = p.add_argument_group("DICOM node")
    ports = ("--port", "--dicom-port") if listen else ("--dicom-port",)
    hosts = ("--host", "--dicom-host") if listen else ("--dicom-host",)
    g.add_argument(
        *ports,
        dest="dicom_port",
        type=port_arg,
        default=DEFAULT_PORT if listen else None,
        metavar="N",
        help="DICOM port to receive studies on (C-STORE, C-ECHO); 0: a free one"
        + (f" (default {DEFAULT_PORT})" if listen else " (default: no DICOM node)"),
    )
    g.add_argument(
        *hosts,
        dest="dicom_host",
        default="127.0.0.1",
        metavar="ADDR",
        help="address to bind (default 127.0.0.1: this device only; a LAN address is logged as such)",
    )
    g.add_argument(
        "--ae-title", type=_ae, default=DEFAULT_AE, help=f"this node's AE title (default {DEFAULT_AE})"
    )
    g.add_argument(
        "--allow-ae",
        type=_ae,
        action="append",
        default=[],
        metavar="AE",
        help="accept associations only from this calling AE title (repeat for more; default: any)",
    )
    g.add_argument(
        "--allow-peer",
        type=_peer,
        action="append",
        default=[],
        metavar="IP",
        help="accept associations only from this address or network, e.g. 192.168.1.0/24 (repeatable)",
    )
    add_data_flag(p)


def data_root(args: argparse.Namespace) -> Path:
    """The data directory the flags name (``--data``, else :func:`edge.files.data_dir`)."""
    from edge.files import data_dir

    return Path(args.data) if getattr(args, "data", None) else data_dir()


def open_store(args: argparse.Namespace):
    """The :class:`~edge.studies.store.StudyStore` in ``data_root(args) / "studies"`` (created)."""
    from edge.studies.store import StudyStore

    return StudyStore(data_root(args) / "studies")


def node_from_args(args: argparse.Namespace, store, on_stored=None):
    """The :class:`~android_bridge.dicom_node.DicomNode` the flags describe (not started), or
    None when no DICOM port was given (``serve`` without ``--dicom-port``)."""
    if getattr(args, "dicom_port", None) is None:
        return None
    from android_bridge.dicom_node import DicomNode

    return DicomNode(
        store,
        host=args.dicom_host,
        port=args.dicom_port,
        ae_title=args.ae_title,
        allowed_aes=tuple(args.allow_ae),
        allowed_peers=tuple(args.allow_peer),
        on_stored=on_stored,
    )


# --- the verb -----------------------------------------------------------------------------------


def add_dicom_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dicom", help="receive DICOM studies (Storage SCP), import folders, list the study store"
    )
    acts = p.add_subparsers(dest="action", metavar="ACTION")
    acts.required = True
    lis = acts.add_parser("listen", help="run a DICOM node (C-ECHO, C-STORE) that stores what it receives")
    add_dicom_flags(lis, listen=True)
    imp = acts.add_parser("import", help="store every DICOM file under a folder (recursive)")
    imp.add_argument("folder", type=Path, metavar="FOLDER")
    add_data_flag(imp)
    imp.add_argument("--json", action="store_true", help="print one JSON report")
    ls = acts.add_parser("list", help="the received studies, newest first")
    add_data_flag(ls)
    ls.add_argument(
        "--modality", help="only studies with a series of this modality (CT, CR, DX, MR, US, ...)"
    )
    ls.add_argument("--from", dest="date_from", metavar="DATE", help="study date from (YYYY-MM-DD)")
    ls.add_argument("--to", dest="date_to", metavar="DATE", help="study date to (YYYY-MM-DD)")
    ls.add_argument("--limit", type=int, default=50, help="at most this many (1 to 200, default 50)")
    ls.add_argument("--offset", type=int, default=0, help="skip this many (paging)")
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    chk = acts.add_parser(
        "check", help="compare the catalogue with the stored files; re-link or drop what disagrees"
    )
    add_data_flag(chk)
    chk.add_argument("--quick", action="store_true", help="compare sizes only (no re-hashing of every file)")
    chk.add_argument("--no-repair", action="store_true", help="only report")
    chk.add_argument("--json", action="store_true", help="print one JSON report")
    p.set_defaults(func=run_dicom)


def run_dicom(args: argparse.Namespace) -> int:
    return {"listen": _listen, "import": _import, "list": _list, "check": _check}[args.action](args)


def _listen(args) -> int:
    with open_store(args) as store:
        node = node_from_args(args, store)
        node.start()
        print(
            f"DICOM node {node.ae_title} listening on {node.host}:{node.port}, storing into {store.root} "
            "(Ctrl-C to stop)",
            flush=True,
        )
        previous = signal.signal(signal.SIGTERM, lambda *_: node.stop())
        try:
            node.serve_forever()
        except KeyboardInterrupt:
            node.stop()
        finally:
            signal.signal(signal.SIGTERM, previous)
        s = node.stats
        print(
            f"stopped: {s['stored']} stored, {s['duplicates']} duplicates, {s['failed']} failed, "
            f"{s['rejected']} associations refused",
            flush=True,
        )
    return 0


def _import(args) -> int:
    with open_store(args) as store:
        with progress.bar("importing", unit="file", enabled=not args.json) as cb:
            rep = store.import_folder(args.folder, progress=cb)
    if rep["files"] == 0 and not rep["skipped"]:
        raise InputError(
            f"{args.folder} holds no files; give the folder with the DICOM files (e.g. the stick's root)"
        )
    if args.json:
        emit_json({"ok": True, **rep})
    else:
        for name, why in rep["skipped"]:
            print(f"skipped {name}: {why}", file=sys.stderr)
        print(
            f"imported {rep['stored']} instances ({rep['bytes'] / 2**20:.1f} MiB), {rep['duplicates']} already "
            f"stored, {len(rep['skipped'])} skipped, in {rep['seconds']:.1f} s"
        )
    if rep["stored"] == 0 and rep["duplicates"] == 0:
        return InputError.exit_code  # nothing in the folder was DICOM
    return 0


def _list(args) -> int:
    with open_store(args) as store:
        page = store.list_studies(
            offset=args.offset,
            limit=args.limit,
            modality=args.modality,
            date_from=args.date_from,
            date_to=args.date_to,
        )
    if args.json:
        emit_json({"ok": True, **page})
        return 0
    if not page["studies"]:
        print("no studies" + (" match" if page["total"] else " received yet"))
        return 0
    print(
        f"{'received (UTC)':<20} {'modality':<9} {'body part':<12} {'study date':<10} {'inst':>5} {'shown':>5}  patient"
    )
    for s in page["studies"]:
        print(
            f"{s['received'][:19].replace('T', ' '):<20} {','.join(s['modalities']) or '-':<9} "
            f"{','.join(s['body_parts']) or '-':<12.12} {s['study_date'] or '-':<10} {s['instance_count']:>5} "
            f"{s['displayable_count']:>5}  {s['patient_name'] or '-'}"
        )
    shown = len(page["studies"])
    if page["total"] > shown:
        print(f"({shown} of {page['total']} studies from {page['offset']}; --offset/--limit for more)")
    return 0


def _check(args) -> int:
    with open_store(args) as store:
        rep = store.check(verify=not args.quick, repair=not args.no_repair)
    if args.json:
        emit_json({"ok": rep["ok"], "report": rep})
    else:
        verb = "removed" if rep["repaired"] else "found"
        print(
            f"{rep['instances']} instances catalogued; {len(rep['missing'])} with a missing file and "
            f"{len(rep['mismatched'])} with a damaged file {verb}; {len(rep['relinked'])} files re-linked, "
            f"{len(rep['orphans'])} not catalogued, {len(rep['removed'])} stale copies removed, "
            f"{len(rep['unreadable'])} unreadable ({rep['seconds']:.1f} s)"
        )
    return 0 if rep["ok"] else InputError.exit_code
