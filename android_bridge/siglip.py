"""MedSigLIP and the similar-case index, as the bridge reaches them.

The encoder is :class:`edge.siglip.MedSigLIP` (``embed_images``, ``embed_texts``, ``classify``)
and the index :class:`edge.cases.CaseIndex` (``search_image``, ``search_text``); this module
only opens them and describes them for ``health``. When a build lacks one of those modules,
opening fails with a ``not_loaded`` error that names what is missing.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from android_bridge.protocol import ProtocolError
from edge.bundle.manifest import Bundle


def _module(name: str, what: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ProtocolError("not_loaded", f"{what} is not available in this build ({name}: {exc})") from None


def open_encoder(bundle: Bundle, *, precision: str | None = None, threads: int | None = None) -> Any:
    """The bundle's MedSigLIP (vision and text towers).

    Raises:
        ProtocolError(not_loaded): edge.siglip is not in this build.
        InputError / IntegrityError: no medsiglip component, no such precision, a damaged file.
    """
    siglip = _module("edge.medsiglip.model", "MedSigLIP")
    return siglip.MedSigLIP(bundle, precision=precision, threads=threads)


def describe_encoder(enc: Any) -> dict:
    """Non-identifying facts about a loaded encoder, for ``health`` and ``load``."""
    info = getattr(enc, "info", None)
    if isinstance(info, dict):
        return info
    comp = enc.bundle.component("medsiglip") if hasattr(enc, "bundle") else {}
    return {
        "bundle": str(getattr(getattr(enc, "bundle", None), "root", "")),
        "precision": getattr(enc, "precision", None),
        "dim": getattr(enc, "dim", None),
        "fingerprint": getattr(enc, "fingerprint", None),
        "label_sets": sorted(getattr(enc, "label_sets", {}) or {}),
        "synthetic": bool(comp.get("source", {}).get("synthetic")),
    }


def open_index(directory: Path, encoder: Any = None) -> Any:
    """The similar-case index in ``directory`` (checked against ``encoder``'s fingerprint).

    Raises:
        ProtocolError(not_loaded): edge.cases is not in this build.
        InputError: no index there, or one built with another encoder.
    """
    cases = _module("edge.cases.index", "the similar-case index")
    return cases.CaseIndex.open(directory, encoder=encoder)


def classification(out: Any) -> dict:
    """edge.medsiglip.model's Classification (ranked) → the ``classify`` result."""
    if isinstance(out, dict):
        return out
    ranked = list(out.ranked)
    return {
        "label_set": out.label_set,
        "labels": [r.label for r in ranked],
        "scores": [float(r.score) for r in ranked],
        "logits": [float(r.logit) for r in ranked],
        "precision": out.precision,
        "note": out.note,
    }
