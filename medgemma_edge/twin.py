"""``medgemma-edge twin``: write a synthetic twin checkpoint (the work is in export.twin)."""

from __future__ import annotations

import argparse

from medgemma_edge import progress


def add_twin_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "twin",
        help="write a synthetic twin checkpoint (real architecture, random weights)",
        description="Write a Hugging Face checkpoint with the real model's architecture, config keys, "
        "file layout and tokenizer files, and random weights from a fixed seed.",
    )
    p.add_argument("model", help="medgemma or medsiglip")
    p.add_argument("--size", default="tiny", help="tiny (tests, seconds) or full (real dimensions)")
    p.add_argument("--out", required=True, help="new directory to write (must not exist or be empty)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_twin)


def run_twin(args: argparse.Namespace) -> int:
    from export.twin import build_twin

    with progress.bar(f"twin {args.model} {args.size}", unit="tensors") as cb:
        info = build_twin(args.model, size=args.size, out=args.out, seed=args.seed, progress=cb)
    print(
        f"{info.path}: synthetic twin of {info.model_id} ({info.size}, seed {info.seed}), "
        f"{info.params:,} parameters, {info.bytes / 2**20:,.1f} MiB, {info.seconds:.1f}s"
    )
    return 0
