"""Golden transcripts (android_bridge/fixtures/*.jsonl): read them and check replies against them.

A transcript is JSON lines: ``{"send": request}`` (or ``{"send_raw": "text"}``, optionally with
``"status"``: the HTTP status of /v1/rpc) followed by ``{"expect": pattern}`` lines, each with an
optional ``"repeat"``: ``"*"`` (zero or more replies) or ``"+"`` (one or more). Pattern strings
``<any>``, ``<string>``, ``<number>``, ``<int>``, ``<bool>``, ``<object>``, ``<array>``, ``<null>``,
``<absent>`` (the key must not be there) and ``<enum:a|b>`` stand for volatile values (ids of
generated text, timings, embeddings); an object matches when every key of the pattern matches
(other keys may be present); arrays match element by element. The Java side
(``Transcript.java``) implements the same rules; both replay the same files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@dataclass
class Step:
    body: str | dict  # the request (a dict) or raw text
    status: int | None = None
    expect: list[dict] = field(default_factory=list)


def read(path: str | Path) -> list[Step]:
    steps: list[Step] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        obj = json.loads(line)
        if "send" in obj or "send_raw" in obj:
            steps.append(Step(obj["send"] if "send" in obj else obj["send_raw"], obj.get("status")))
        elif "expect" in obj:
            steps[-1].expect.append(obj)
    return steps


def check(expect: list[dict], replies: list[dict]) -> str | None:
    """None when ``replies`` match ``expect`` (greedy, in order), else what went wrong."""
    i = 0
    for e in expect:
        pattern, repeat, n = e["expect"], e.get("repeat", ""), 0
        while i < len(replies) and matches(pattern, replies[i]):
            i, n = i + 1, n + 1
            if not repeat:
                break
        if n == 0 and repeat != "*":
            got = replies[i] if i < len(replies) else "(no more replies)"
            return f"expected {pattern} but got {got}"
    if i != len(replies):
        return f"unexpected extra reply {replies[i]}"
    return None


_TYPES = {
    "<string>": lambda a: isinstance(a, str),
    "<number>": lambda a: isinstance(a, int | float) and not isinstance(a, bool),
    "<int>": lambda a: isinstance(a, int) and not isinstance(a, bool),
    "<bool>": lambda a: isinstance(a, bool),
    "<object>": lambda a: isinstance(a, dict),
    "<array>": lambda a: isinstance(a, list),
    "<null>": lambda a: a is None,
    "<any>": lambda a: True,
}


def matches(pattern: Any, actual: Any) -> bool:
    if isinstance(pattern, str) and pattern.startswith("<") and pattern.endswith(">"):
        if pattern.startswith("<enum:"):
            return str(actual) in pattern[6:-1].split("|")
        return _TYPES[pattern](actual) if pattern in _TYPES else pattern == actual
    if isinstance(pattern, dict):
        if not isinstance(actual, dict):
            return False
        for k, pv in pattern.items():
            if pv == "<absent>":
                if k in actual:
                    return False
            elif k not in actual or not matches(pv, actual[k]):
                return False
        return True
    if isinstance(pattern, list):
        return (
            isinstance(actual, list)
            and len(pattern) == len(actual)
            and all(matches(p, a) for p, a in zip(pattern, actual, strict=True))
        )
    if isinstance(pattern, bool) or isinstance(actual, bool):
        return pattern is actual
    return pattern == actual
