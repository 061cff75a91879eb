"""``medgemma-edge export`` (per model kind) and ``import``: dispatch to the kind's module.

Only parsing and printing here; the work is in export.gguf and export.onnx.
"""

from __future__ import annotations

import argparse
import importlib

# export <kind> -> module defining add_parser(kinds) for it
EXPORTERS = {"medgemma": "medgemma_edge.export_medgemma", "medsiglip": "medgemma_edge.export_medsiglip"}


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint into a bundle (medgemma → GGUF, medsiglip → ONNX)")
    kinds = p.add_subparsers(dest="kind", metavar="MODEL")
    kinds.required = True
    for module in EXPORTERS.values():
        importlib.import_module(module).add_parser(kinds)


def add_import_parser(sub: argparse._SubParsersAction) -> None:
    importlib.import_module(EXPORTERS["medgemma"]).add_import_parser(sub)
