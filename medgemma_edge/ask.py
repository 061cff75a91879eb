"""``medgemma-edge ask``: one question (with images) to the bundle's MedGemma, streamed."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from edge.errors import InputError, UsageError
from medgemma_edge.common import emit_json
from medgemma_edge.options import add_model_options, open_model


def add_ask_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ask", help="ask MedGemma a question, optionally about images (PNG, JPEG, DICOM)")
    p.add_argument("question")
    add_model_options(p)
    p.add_argument(
        "--image", action="append", default=[], type=Path, help="an image file; repeat for several"
    )
    p.add_argument("--frame", type=int, help="which frame of a multi-frame DICOM (default: the middle one)")
    p.add_argument("--system", help="system instructions (folded into the first user turn for Gemma 3)")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 = greedy (the default for MedGemma)")
    p.add_argument("--seed", type=int, help="makes sampled output repeatable")
    p.add_argument("--schema", help="constrain the answer to a JSON schema: a FILE.json or 'report'")
    p.add_argument("--json", action="store_true", help="print one JSON object (answer, usage, timings, ...)")
    p.set_defaults(func=run_ask)


def load_schema(arg: str | None) -> dict | None:
    """The JSON schema ``--schema`` names: a built-in name (``report``) or a JSON file (a regular
    file of at most :data:`edge.files.MAX_JSON_BYTES`, 8 MiB, holding a JSON object)."""
    from edge.files import FileMissing, read_json
    from edge.medgemma.generation import builtin_schema

    if arg is None:
        return None
    if (schema := builtin_schema(arg)) is not None:
        return schema
    try:
        schema = read_json(Path(arg), what="schema")
    except FileMissing:
        raise InputError(f"schema {arg} not found (a JSON file, or one of: report)") from None
    if not isinstance(schema, dict):
        raise InputError(f"schema {arg} is not a JSON object (a JSON schema is one)")
    return schema


def run_ask(args: argparse.Namespace) -> int:
    from edge.medgemma.model import GenerateOptions
    from edge.media.images import load_image

    if args.max_tokens is not None and args.max_tokens <= 0:
        raise UsageError("--max-tokens must be positive")
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature must be a finite number of at least 0 (got {args.temperature})")
    images = [load_image(p, frame=args.frame) for p in args.image]  # bad images fail before the model loads
    options = GenerateOptions(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        schema=load_schema(args.schema),
    )
    with open_model(args) as model:

        def show(piece):
            if not args.json and piece.text:
                sys.stdout.write(piece.text)
                sys.stdout.flush()

        answer = model.ask(args.question, images=images, system=args.system, options=options, on_piece=show)
    if args.json:
        emit_json({"ok": True, **answer.to_json()})
        return 0
    t = answer.timings
    label = (
        " — SYNTHETIC TWIN, random weights: this output means nothing" if answer.model["synthetic"] else ""
    )
    print(f"\n\n[{answer.disclaimer}]{label}")
    print(
        f"{answer.usage['completion_tokens']} tokens, {t['generation_tps']:.1f} tok/s, first token "
        f"{t['ttft_s']:.2f}s, finish: {answer.finish_reason}; images: {answer.image_cache['misses']} encoded, "
        f"{answer.image_cache['hits']} from cache",
        file=sys.stderr,
    )
    return 0
