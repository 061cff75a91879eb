"""What a report holds, checked before it is stored: the clinician's text against the structured
report schema (``edge/medgemma/schemas/report.json``, the one the model drafts with), the source
image, the model provenance and the signer.

The schema is read from the runtime's own copy and checked with a small validator of the JSON
Schema subset it uses (object / array / string / boolean, ``properties``, ``required``, ``enum``,
``maxItems``, ``items``): jsonschema is not a runtime dependency. Unknown fields in ``final`` are
refused (an export would silently drop them); the AI ``draft`` is kept verbatim, only bounded.
Every failure is a :class:`~edge.errors.UsageError` naming the field.
"""

from __future__ import annotations

import json
import re
from typing import Any

from edge.errors import UsageError

MAX_TEXT = 4000  # characters of one text field (a finding, the impression, ...)
MAX_JSON = 256 << 10  # bytes of one report body (draft or final) as JSON
MAX_NAME = 64  # characters of a signer's name or role (a DICOM PN component group holds 64)
MAX_REASON = 1000  # characters of an amendment's reason
MAX_PROVENANCE_KEYS = 16

DISCLAIMER = "AI-drafted, reviewed and signed by the clinician; decision support, not a diagnosis."

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
SOURCE_KEYS = ("study_uid", "series_uid", "instance_uid", "image_sha256", "frame")
PROVENANCE_KEYS = ("model", "bundle", "quantization", "synthetic", "runtime_version")
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool}

_schema: dict | None = None


def report_schema() -> dict:
    """The structured report schema the model drafts with (read once)."""
    global _schema
    if _schema is None:
        from edge.medgemma.generation import builtin_schema

        _schema = builtin_schema("report")
        if _schema is None:  # a broken installation, not a user error
            raise RuntimeError("edge/medgemma/schemas/report.json is missing from this installation")
    return _schema


def _check(value: Any, schema: dict, where: str) -> None:
    kind = schema.get("type")
    if kind in _TYPES:
        ok = isinstance(value, _TYPES[kind]) and not (kind != "boolean" and isinstance(value, bool))
        if not ok:
            raise UsageError(f"{where} must be {'an' if kind in ('object', 'array') else 'a'} {kind}")
    if "enum" in schema and value not in schema["enum"]:
        raise UsageError(f"{where} must be one of {', '.join(map(str, schema['enum']))}, not {value!r:.40}")
    if isinstance(value, str) and len(value) > MAX_TEXT:
        raise UsageError(f"{where}: at most {MAX_TEXT} characters, not {len(value)}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name in schema.get("required", ()):
            if name not in value:
                raise UsageError(f"{where} needs the field '{name}'")
        for name, item in value.items():
            if name not in props:
                raise UsageError(
                    f"{where} has an unknown field '{name:.40}' (the fields are: {', '.join(props)})"
                )
            _check(item, props[name], f"{where}.{name}")
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise UsageError(f"{where} may have at most {schema['maxItems']} items, not {len(value)}")
        for i, item in enumerate(value):
            _check(item, schema.get("items", {}), f"{where}[{i}]")


def _bounded(name: str, body: Any) -> None:
    if not isinstance(body, dict):
        raise UsageError(f"{name} must be an object (the structured report)")
    try:
        size = len(json.dumps(body, ensure_ascii=False).encode("utf-8"))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{name} must be plain JSON ({exc})") from None
    if size > MAX_JSON:
        raise UsageError(f"{name}: {size} bytes is over the {MAX_JSON} byte limit of a report")


def check_final(final: Any) -> dict:
    """The clinician's report, checked against the report schema (unknown fields refused)."""
    _bounded("final", final)
    _check(final, report_schema(), "final")
    if not final["impression"].strip():
        raise UsageError("final.impression can't be empty: write the impression before saving")
    return final


def check_draft(draft: Any) -> dict | None:
    """The AI draft exactly as generated: any JSON object (it may not match the schema), bounded."""
    if draft is None:
        return None
    _bounded("draft", draft)
    return draft


def check_source(source: Any) -> dict:
    """``{"study_uid"?, "series_uid"?, "instance_uid"?, "image_sha256"?, "frame"?}``: a study or an
    image hash at least; UIDs in DICOM form, the hash 64 lowercase hex."""
    if not isinstance(source, dict):
        raise UsageError(
            "source must be an object: {study_uid, series_uid?, instance_uid?} or {image_sha256}"
        )
    for key, value in source.items():
        if key not in SOURCE_KEYS:
            raise UsageError(
                f"source has an unknown field '{key:.40}' (the fields are: {', '.join(SOURCE_KEYS)})"
            )
        if key == "frame":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 100_000:
                raise UsageError("source.frame must be a frame number from 0")
        elif key == "image_sha256":
            if not isinstance(value, str) or not _SHA256.fullmatch(value):
                raise UsageError("source.image_sha256 must be 64 lowercase hex digits (the image's sha256)")
        elif not isinstance(value, str) or len(value) > 64 or not _UID.fullmatch(value):
            raise UsageError(f"source.{key} must be a DICOM UID (digits and dots, at most 64 characters)")
    if "study_uid" not in source and "image_sha256" not in source:
        raise UsageError("source needs study_uid (a received study) or image_sha256 (an uploaded image)")
    if "instance_uid" in source and "study_uid" not in source:
        raise UsageError("source.instance_uid needs source.study_uid")
    return dict(source)


def check_provenance(provenance: Any) -> dict:
    """``{"model", "bundle", "quantization", "synthetic", "runtime_version"}`` (+ a few more scalar
    facts): ``model`` a non-empty string, ``synthetic`` a boolean, the rest strings or null."""
    if not isinstance(provenance, dict):
        raise UsageError(f"provenance must be an object with {', '.join(PROVENANCE_KEYS)}")
    if len(provenance) > MAX_PROVENANCE_KEYS:
        raise UsageError(f"provenance may have at most {MAX_PROVENANCE_KEYS} fields")
    model = provenance.get("model")
    if not isinstance(model, str) or not model.strip():
        raise UsageError("provenance.model must name the model that drafted the report")
    if not isinstance(provenance.get("synthetic"), bool):
        raise UsageError(
            "provenance.synthetic must be true or false (a synthetic twin's bundle or a real model)"
        )
    for key, value in provenance.items():
        if not isinstance(key, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", key):
            raise UsageError(f"provenance field name {key!r:.40} must be lowercase letters, digits and _")
        if value is not None and not isinstance(value, str | int | float | bool):
            raise UsageError(f"provenance.{key} must be a string, a number, a boolean or null")
        if isinstance(value, str) and len(value) > 512:
            raise UsageError(f"provenance.{key}: at most 512 characters")
    return dict(provenance)


def check_person(what: str, value: Any, limit: int = MAX_NAME) -> str:
    """A signer's name or role, an amendment's reason: non-empty text of at most ``limit`` characters."""
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{what} is required and can't be empty")
    value = " ".join(value.split())
    if not value.isprintable():
        raise UsageError(f"{what} can't contain control characters")
    if len(value) > limit:
        raise UsageError(f"{what}: at most {limit} characters, not {len(value)}")
    return value


def finding_text(finding: dict) -> str:
    """One finding as a line: "pleural effusion (left lower zone), probable"."""
    where = f" ({finding['location']})" if finding.get("location") else ""
    return f"{finding['finding']}{where}, {finding['certainty']}"
