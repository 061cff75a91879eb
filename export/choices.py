"""Comma-separated choices on the export side (``--quant Q4_K_M,Q8_0``, ``--precision int8,fp32``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from edge.errors import UsageError


def parse_choices(
    spec: str | Sequence[str],
    *,
    choices: Iterable[str],
    what: str,
    normalize: Callable[[str], str] = str.lower,
    none_given: str | None = None,
) -> list[str]:
    """``"a, B,a"`` → ``["a", "b"]``: each item stripped and normalized, blanks skipped, order kept.

    Args:
        spec: a comma-separated string, or a list of items.
        choices: the normalized names allowed.
        what: what an item is, for the error (``"quantization"``).
        normalize: maps an item to its canonical spelling (lower case by default).
        none_given: the error when nothing is left; None allows an empty list.

    Raises:
        UsageError: an unknown item (named as given), or no item when ``none_given`` is set.
    """
    allowed = list(choices)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in items:
        name = normalize(raw.strip())
        if not name:
            continue
        if name not in allowed:
            raise UsageError(f"unknown {what} {raw.strip()!r}; choose from {', '.join(allowed)}")
        if name not in out:
            out.append(name)
    if not out and none_given:
        raise UsageError(none_given)
    return out
