"""CLI glue for ``export medsiglip`` (filled in by the ONNX exporter)."""

from __future__ import annotations

import argparse


def add_parser(kinds: argparse._SubParsersAction) -> None:
    kinds.add_parser("medsiglip", help="MedSigLIP checkpoint → ONNX vision + text towers (not built yet)")
