"""Bundle-level commands: ``verify``."""

from __future__ import annotations

import argparse

from edge.bundle.manifest import open_bundle
from edge.errors import IntegrityError, UsageError
from medgemma_edge import progress
from medgemma_edge.common import default_bundle, emit_json


def add_verify_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="re-hash a bundle's files and check their headers")
    p.add_argument(
        "bundle", nargs="?", default=default_bundle(), help="bundle directory ($MEDGEMMA_EDGE_BUNDLE)"
    )
    p.add_argument(
        "--full", action="store_true", help="re-hash every file even if a verify stamp says it is unchanged"
    )
    p.add_argument("--json", action="store_true", help="print one JSON report on stdout")
    p.set_defaults(func=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    if not args.bundle:
        raise UsageError("give a bundle directory or set MEDGEMMA_EDGE_BUNDLE")
    b = open_bundle(args.bundle)
    with progress.bar("verify", enabled=not args.json) as cb:
        report = b.verify(trust_stamp=not args.full, progress=cb)
    if args.json:
        emit_json({"ok": report.ok, **report.to_json(), "synthetic": b.synthetic})
    else:
        for f in report.files:
            status = "ok " if f.ok else "BAD"
            how = "hashed" if f.hashed else "stamp"
            facts = " ".join(f"{k}={v}" for k, v in f.facts.items())
            print(
                f"{status} {f.path:<40} {f.bytes:>14,d} B  {how:<6} {facts}{'  ' + f.error if f.error else ''}"
            )
        print(
            f"{'bundle ok' if report.ok else 'bundle FAILED verification'}: {b.root}"
            + (" (synthetic twin: random weights)" if b.synthetic else "")
        )
    if args.json:
        return 0 if report.ok else IntegrityError.exit_code
    report.raise_for_failure()
    return 0
