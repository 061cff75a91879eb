"""What the export does for quality beyond converting: the importance matrix and the KL report,
decided (and every input checked) before any work starts.

:func:`plan_quality` resolves ``--imatrix`` / ``--kl-text`` and finds llama.cpp's tools once;
:func:`kl_report` runs :func:`export.gguf.kl.report` for the files the bundle keeps. The ladder
itself (which types, in which order) is :data:`export.gguf.quantize.QUANTS`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge.errors import MissingDependency
from export.gguf.imatrix import TextSet, text_set
from export.gguf.llama_tools import MAKE_TARGET, Tools, find_tools

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QualityPlan:
    """The importance matrix's text (if any), the KL report's held-out text, and the tools."""

    texts: TextSet
    tools: Tools | None
    kl: bool
    kl_skipped: str | None  # why an automatic KL report did not run (recorded in the manifest)


def plan_quality(*, imatrix: str | None, kl: bool, required: bool, kl_text: str | None) -> QualityPlan:
    """Check the texts and find the tools, before the export converts anything.

    Args:
        imatrix: ``--imatrix`` (None, ``"default"`` or a file).
        kl: whether to run the KL report.
        required: the KL report was asked for explicitly: missing tools are an error, not a
            recorded skip.

    Raises:
        InputError: a text file is unusable. MissingDependency: the tools are needed (an
        importance matrix, or ``required``) and not built; the message names the make target.
    """
    texts = text_set(imatrix, heldout=kl_text)
    tools = None
    skipped = None
    if imatrix is not None or kl:
        try:
            tools = find_tools()
        except MissingDependency as exc:
            if imatrix is not None or required:
                raise
            skipped = f"llama.cpp's tools are not built ({MAKE_TARGET})"
            log.info("KL report skipped (recorded in the manifest): %s", exc)
            kl = False
    return QualityPlan(texts, tools, kl, skipped)


def kl_report(
    plan: QualityPlan,
    ref_quant: str,
    ref_path: Path,
    kept: dict[str, Path],
    *,
    work: Path,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """The KL table of every kept text file against the conversion ``ref_path``, on the plan's
    held-out text (:func:`export.gguf.kl.report`)."""
    from export.gguf.kl import report

    assert plan.tools is not None, "plan_quality found the tools when kl is on"
    table = report(
        plan.tools,
        reference_file=(ref_quant, ref_path),
        texts=kept,
        heldout=plan.texts.heldout,
        heldout_info=plan.texts.heldout_info,
        work=work,
        threads=threads,
        progress=progress,
    )
    table["imatrix"] = plan.texts.calibration is not None
    return table
