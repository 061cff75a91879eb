"""What a generation is: its options, the pieces a stream yields, the joined answer, and the
check of a schema-constrained answer. Shared by the runtime (edge.medgemma.model), the CLI and the bridge.
"""

from __future__ import annotations

import importlib.resources
import json
from dataclasses import dataclass, field
from typing import Any

DISCLAIMER = (
    "Decision support for qualified professionals under human oversight; not a diagnosis. "
    "Verify every finding independently."
)


def builtin_schema(name: str) -> dict | None:
    """A JSON schema shipped with the runtime (``report``: the structured report), or None."""
    res = importlib.resources.files(__package__).joinpath("schemas", f"{name}.json")
    return json.loads(res.read_text(encoding="utf-8")) if res.is_file() else None


@dataclass
class GenerateOptions:
    """Sampling and output options; None means the bundle's default (greedy for MedGemma)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float = 0.95
    top_k: int = 64
    min_p: float = 0.0
    repeat_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    schema: dict | None = None  # constrain the answer to this JSON schema (llama.cpp grammar)


@dataclass
class Piece:
    """One step of a stream. The last one has ``finish_reason`` and ``usage`` set."""

    text: str
    n_tokens: int  # tokens generated so far
    finish_reason: str | None = None  # stop | length | cancelled | error
    usage: dict | None = None
    timings: dict | None = None
    parsed: Any = None  # the JSON value, when a schema constrained the answer
    schema_errors: list[str] | None = None  # what the grammar could not enforce; None = unchecked


@dataclass
class Answer:
    text: str
    finish_reason: str
    usage: dict
    timings: dict
    model: dict
    parsed: Any = None
    schema_errors: list[str] | None = None
    image_cache: dict = field(default_factory=dict)
    disclaimer: str = DISCLAIMER

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def check_schema(value: Any, schema: dict) -> list[str] | None:
    """Validate a constrained answer. llama.cpp's grammar enforces structure, types, enums,
    string lengths, array sizes and patterns, but not numeric ranges or formats, so the result
    is checked again here (with ``jsonschema`` when installed; None when it isn't)."""
    try:
        import jsonschema
    except ImportError:
        return None
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in validator.iter_errors(value)
    ]
