"""``medgemma-edge``: one command line over every part of the product.

The CLI only parses and prints. Each verb lives in a module that registers its parser with
``add_parser(subparsers)`` and does its work through library functions; modules are imported
per command, so a device without torch can run ``ask`` while ``export`` there says which extra
to install. Errors from the library (``edge.errors``) become one line on stderr and the exit
codes of shared/DESIGN.md: 0 ok, 2 usage, 3 bad input, 4 resource, 1 anything else.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

from edge import __version__
from edge.errors import EdgeError

# verb -> module that defines add_parser(subparsers) for it; imported lazily, in this order.
COMMANDS: dict[str, str] = {
    "twin": "export.cli",
    "export": "export.cli",
    "import": "export.cli",
    "verify": "edge.commands",
    "ask": "edge.ask",
    "bench": "edge.bench",
    "classify": "edge.cases_cli",
    "index": "edge.cases_cli",
    "search": "edge.cases_cli",
    "demo": "edge.demo",
    "serve": "android_bridge.serve",
}

PROG = "medgemma-edge"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Offline MedGemma (GGUF) and MedSigLIP (ONNX) on clinic laptops, Jetsons and phones. "
        "Outputs are decision support under human oversight, not a diagnosis.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log progress details (-vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    seen: set[str] = set()
    for verb, module in COMMANDS.items():
        if (module, verb) in seen:
            continue
        mod = importlib.import_module(module)
        getattr(mod, f"add_{verb}_parser")(sub)
        seen.add((module, verb))
    return parser


def default_bundle() -> str | None:
    return os.environ.get("MEDGEMMA_EDGE_BUNDLE")


def emit_json(obj: dict) -> None:
    """The one JSON object a ``--json`` command prints on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return int(args.func(args) or 0)
    except EdgeError as exc:
        if getattr(args, "json", False):
            emit_json(
                {"ok": False, "error": {"code": exc.code, "message": str(exc), "exit_code": exc.exit_code}}
            )
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
