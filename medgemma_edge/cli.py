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
import logging
import sys

from edge import __version__
from edge.errors import EdgeError
from medgemma_edge.common import emit_json

# verb -> module that defines add_<verb>_parser(subparsers); only the verb run is imported (all for --help).
COMMANDS: dict[str, str] = {
    "twin": "medgemma_edge.twin",
    "export": "medgemma_edge.export",
    "import": "medgemma_edge.export",
    "verify": "medgemma_edge.verify",
    "ask": "medgemma_edge.ask",
    "bench": "medgemma_edge.bench",
    "eval": "medgemma_edge.eval",
    "classify": "medgemma_edge.cases",
    "index": "medgemma_edge.cases",
    "search": "medgemma_edge.cases",
    "archive": "medgemma_edge.archive",
    "demo": "medgemma_edge.demo.main",
    "serve": "medgemma_edge.serve",
    "lan": "medgemma_edge.lan",
    "dicom": "medgemma_edge.dicom",
    "report": "medgemma_edge.report",
}

PROG = "medgemma-edge"


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The parser: with ``verb`` (a known command) only that command's module is imported."""
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
    for name, module in COMMANDS.items():
        if verb in COMMANDS and name != verb:
            continue
        getattr(importlib.import_module(module), f"add_{name}_parser")(sub)
    return parser


def _verb(argv: list[str]) -> str | None:
    """The command named in ``argv`` (the first word that is not a top-level option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_verb(argv))
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
        one_line = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"{PROG}: error: {one_line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
