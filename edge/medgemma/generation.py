"""What a generation is: its options, the pieces a stream yields, the joined answer, and the
check of a schema-constrained answer. Shared by the runtime (edge.medgemma.model), the CLI and the bridge.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from dataclasses import dataclass, field
from typing import Any

from edge.settings import check, setting

DISCLAIMER = (
    "Decision support for qualified professionals under human oversight; not a diagnosis. "
    "Verify every finding independently."
)


def builtin_schema(name: str) -> dict | None:
    """A JSON schema shipped with the runtime (``report``: the structured report), or None.

    Only a plain name is looked up (a path such as ``/tmp/x`` never reads ``/tmp/x.json``).
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        return None
    res = importlib.resources.files(__package__).joinpath("schemas", f"{name}.json")
    return json.loads(res.read_text(encoding="utf-8")) if res.is_file() else None


MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256  # characters per stop string


@dataclass
class GenerateOptions:
    """Sampling and output options; None means the bundle's default (greedy for MedGemma).

    Declared with :func:`edge.settings.setting`, so every value is range-checked here, once:
    built directly (``GenerateOptions(max_tokens=8)``) or from a request's values with
    ``from_mapping(GenerateOptions, params)``, a bad one is a UsageError naming the field.
    """

    max_tokens: int | None = setting(None, "the most tokens to generate", minimum=1, maximum=1_000_000)
    temperature: float | None = setting(None, "0 = greedy; higher = more random", minimum=0.0, maximum=5.0)
    top_p: float = setting(
        0.95, "nucleus sampling: keep the top tokens of this probability", above=0.0, maximum=1.0
    )
    top_k: int = setting(64, "keep this many most likely tokens (0: all)", minimum=0, maximum=1_000_000)
    min_p: float = setting(
        0.0, "drop tokens below this fraction of the top one's probability", minimum=0.0, maximum=1.0
    )
    repeat_penalty: float | None = setting(
        None, "penalty for repeated tokens (1: none)", above=0.0, maximum=10.0
    )
    # 2**32 - 1 is llama.cpp's "pick a random seed": a given seed always repeats
    seed: int | None = setting(None, "makes sampled output repeatable", minimum=0, maximum=2**32 - 2)
    stop: list[str] | None = setting(
        None, "stop at any of these strings", max_items=MAX_STOP, max_length=MAX_STOP_CHARS
    )
    schema: dict | None = setting(None, "constrain the answer to this JSON schema (llama.cpp grammar)")

    def __post_init__(self) -> None:
        check(self)


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
