"""``medgemma-edge eval``: multiple-choice accuracy of each text file of a bundle.

A thin face over :mod:`edge.medgemma.mcq`: the questions (MedQA JSONL), the files (``--quant``),
then a table (accuracy, Wilson 95% interval, McNemar against the best file) or ``--json``.
"""

from __future__ import annotations

import argparse
import hashlib

from edge.errors import UsageError
from medgemma_edge import progress
from medgemma_edge.common import check_range, emit_json, resolve_bundle

LADDER = ["F32", "BF16", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q4_0", "IQ3_M"]


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="multiple-choice accuracy of each text file (MedQA JSONL), with 95%% intervals",
        description="Ask every question of a MedQA-style JSONL file (question, options, answer_idx) "
        "with each text file of the bundle; the answer is constrained to an option letter by a "
        "grammar and decoded greedily. Prints accuracy with a Wilson 95%% interval and McNemar's "
        "paired test against the most accurate file.",
    )
    p.add_argument("-b", "--bundle", default=None, help="bundle directory ($MEDGEMMA_EDGE_BUNDLE)")
    p.add_argument("--mcq", required=True, metavar="FILE.jsonl", help="the questions, one JSON object a line")
    p.add_argument(
        "--quant", default="all", help="comma list of the bundle's text files (Q4_K_M,Q8_0) or 'all'"
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--ctx", type=int, default=2048, help="context length (a longer question is refused)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON report on stdout")
    p.set_defaults(func=run_eval)


def choose_quants(have: list[str], spec: str) -> list[str]:
    """The text files to evaluate, most bits first (so a tie goes to the larger file).

    Raises:
        UsageError: a quant the bundle does not have.
    """
    order = {q: i for i, q in enumerate(LADDER)}
    if spec.strip().lower() == "all":
        wanted = list(have)
    else:
        wanted = [q.strip().upper() for q in spec.split(",") if q.strip()]
        if not wanted:
            raise UsageError("give --quant all or a comma list of the bundle's text files")
        missing = [q for q in wanted if q not in have]
        if missing:
            raise UsageError(
                f"the bundle has no text file {', '.join(missing)} (it has: {', '.join(have) or 'none'})"
            )
    return sorted(dict.fromkeys(wanted), key=lambda q: order.get(q, len(LADDER)))


def notes(bundle, n: int, mcq_sha: str) -> list[str]:
    """What the figures can't say: a synthetic twin's, a non-medical model's, a small set's."""
    from export.calibration import MCQ_EXAMPLE, path

    out = []
    if bundle.synthetic:
        out.append("synthetic twin: random weights, so these accuracies measure the harness, not a model")
    comp = bundle.component("medgemma")
    if comp.get("source", {}).get("model_id") == "gemma3-270m":
        out.append("Gemma 3 270M is a small general base model, not a medical one")
    try:
        if hashlib.sha256(path(MCQ_EXAMPLE).read_bytes()).hexdigest() == mcq_sha:
            out.append(
                "the shipped example questions are invented and trivial: they measure nothing clinical"
            )
    except FileNotFoundError:
        pass
    lo, hi = _width(n)
    out.append(f"{n} questions: a 95% interval spans about ±{(hi - lo) * 50:.0f} points at 50% accuracy")
    return out


def _width(n: int) -> tuple[float, float]:
    from edge.medgemma.mcq import wilson

    return wilson(n // 2, n)


def run_eval(args: argparse.Namespace) -> int:
    from edge.bundle.manifest import open_bundle
    from edge.files import format_bytes
    from edge.medgemma.mcq import evaluate, load_questions

    check_range("--limit", args.limit, 1)
    check_range("--ctx", args.ctx, 64, 131072)
    check_range("--threads", args.threads, 0, 1024)
    b = open_bundle(resolve_bundle(args.bundle))
    texts = {f.get("quant"): f for f in b.component("medgemma")["files"] if f["role"] == "text"}
    quants = choose_quants(list(texts), args.quant)
    questions = load_questions(args.mcq, limit=args.limit)
    with open(args.mcq, "rb") as fh:
        sha = hashlib.sha256(fh.read()).hexdigest()
    with progress.bar("eval", unit="questions", enabled=not args.json) as cb:
        result = evaluate(
            b,
            questions,
            quants=quants,
            n_ctx=args.ctx,
            threads=args.threads,
            progress=lambda q, d, t: cb(d, t),
        )
    info = notes(b, len(questions), sha)
    if args.json:
        emit_json(
            {
                "ok": True,
                "bundle": str(b.root),
                "mcq": {"questions": len(questions), "sha256": sha},
                "synthetic": b.synthetic,
                "rows": result["rows"],
                "picks": result["picks"],
                "notes": info,
            }
        )
        return 0
    print(f"MCQ: {len(questions)} questions (sha256 {sha[:12]}…), greedy, answer constrained to a letter")
    print(f"  {'file':<8} {'size':>9} {'accuracy':>9}  {'95% interval':<16} vs best (McNemar, exact)")
    for q, row in result["rows"].items():
        lo, hi = row["ci95"]
        if row["best"]:
            vs = "best"
        else:
            m = row["vs_best"]
            dlo, dhi = m["diff_ci95"]
            vs = (
                f"{m['diff'] * 100:+.1f} pts [{dlo * 100:+.1f}, {dhi * 100:+.1f}] vs {m['best']}, "
                f"{m['b']}/{m['c']} discordant, p={m['p_value']:.3f}"
            )
        print(
            f"  {q:<8} {format_bytes(texts[q]['bytes']):>9} {row['accuracy'] * 100:>8.1f}%  "
            f"[{lo * 100:5.1f}%, {hi * 100:5.1f}%]  {vs}"
        )
    for line in info:
        print(f"  note: {line}")
    return 0
