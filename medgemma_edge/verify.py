"""Bundle-level commands: ``verify`` (and the KL table it and ``export`` print)."""

from __future__ import annotations

import argparse

from edge.bundle.manifest import open_bundle
from edge.errors import IntegrityError, UsageError
from edge.files import format_bytes
from medgemma_edge import progress
from medgemma_edge.common import default_bundle, emit_json


def ppl_ratio(kl: dict, row: dict) -> float:
    """A file's perplexity over the reference's, both from full logits (:mod:`export.gguf.kl`
    says why not the tool's own ratio); a manifest written before that figure existed gets it
    from its ``ppl`` values, else the tool's."""
    if "ppl_vs_reference" in row:
        return row["ppl_vs_reference"]
    if kl.get("ppl_reference") and row.get("ppl"):
        return row["ppl"] / kl["ppl_reference"]
    return row["ppl_ratio"]


def kl_table_lines(kl: dict | None, files: list[dict] | None = None) -> list[str]:
    """The KL report of a manifest's ``fidelity.kl`` as table lines (empty when there is none):
    per text file its size and RAM estimate (from ``files``), mean and 99th-percentile KL,
    same-top-token rate and perplexity ratio against the unquantized conversion."""
    if not kl:
        return []
    if "skipped" in kl:
        return [f"KL report: skipped ({kl['skipped']})"]
    by_quant = {f.get("quant"): f for f in files or [] if f.get("role") == "text"}
    text = kl.get("text") or {}
    lines = [
        f"KL vs {kl['reference']} over held-out text ({text.get('bytes', 0):,d} B, sha256 "
        f"{str(text.get('sha256', ''))[:12]}…): {kl['chunks']} chunks of {kl['ctx']} tokens, "
        f"{kl['positions']:,d} positions; importance matrix: {'yes' if kl.get('imatrix') else 'no'}",
        f"  {'file':<8} {'size':>12} {'RAM ~':>10} {'mean KL':>9} {'99% KL':>9} {'same top':>9} {'PPL ratio':>10}",
    ]
    for quant, row in kl["rows"].items():
        f = by_quant.get(quant, {})
        size = format_bytes(f["bytes"]) if "bytes" in f else "-"
        ram = format_bytes(f["ram_bytes"]) if "ram_bytes" in f else "-"
        lines.append(
            f"  {quant:<8} {size:>12} {ram:>10} {row['mean_kl']:>9.5f} {row['kl_p99']:>9.5f} "
            f"{row['same_top'] * 100:>8.2f}% {ppl_ratio(kl, row):>10.4f}"
        )
    return lines


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
    kl = (b.components.get("medgemma", {}).get("fidelity") or {}).get("kl")
    if args.json:
        emit_json({"ok": report.ok, **report.to_json(), "synthetic": b.synthetic, "kl": kl})
    else:
        for f in report.files:
            status = "ok " if f.ok else "BAD"
            how = "hashed" if f.hashed else "stamp"
            facts = " ".join(f"{k}={v}" for k, v in f.facts.items())
            print(
                f"{status} {f.path:<40} {f.bytes:>14,d} B  {how:<6} {facts}{'  ' + f.error if f.error else ''}"
            )
        for line in kl_table_lines(kl, b.components.get("medgemma", {}).get("files")):
            print(line)
        if kl and b.synthetic:
            print("  (synthetic twin: random weights; the figures test the pipeline, not a model)")
        print(
            f"{'bundle ok' if report.ok else 'bundle FAILED verification'}: {b.root}"
            + (" (synthetic twin: random weights)" if b.synthetic else "")
        )
    if args.json:
        return 0 if report.ok else IntegrityError.exit_code
    report.raise_for_failure()
    return 0
