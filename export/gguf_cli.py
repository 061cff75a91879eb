"""CLI glue for ``export medgemma`` and ``import medgemma`` (filled in by the GGUF exporter)."""

from __future__ import annotations

import argparse


def add_parser(kinds: argparse._SubParsersAction) -> None:
    kinds.add_parser("medgemma", help="MedGemma checkpoint → GGUF text model + mmproj (not built yet)")


def add_import_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("import", help="add a GGUF made elsewhere to a bundle (not built yet)")
