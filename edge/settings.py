"""Settings schemas: one frozen dataclass per model, the single place a knob is declared.

A field is declared with :func:`setting` (default, one-line help, and what a value may be); the
same declaration then drives everything that handles settings:

* a device profile produces them (:mod:`edge.device.profiles`),
* the command line generates its flags from them (``medgemma_edge.options``),
* the bridge's ``load`` op validates its ``options`` against them (:func:`from_mapping`),
* the model takes them (``MedGemma(bundle, settings)``).

Adding a knob is one field in one dataclass. Values from outside (a profile file, a request)
go through :func:`from_mapping`, which refuses unknown names, wrong types, values out of range
and non-finite numbers with a :class:`~edge.errors.UsageError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from edge.errors import UsageError

S = TypeVar("S")


def setting(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    choices: tuple | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    max_items: int | None = None,
    max_length: int | None = None,
    cli: bool = True,
    remote: bool = True,
    profile: str | None = None,
) -> Any:
    """A settings field.

    Args:
        default: the value when nothing (profile, flag, request) says otherwise.
        help: one line, shown by ``--help``.
        flag: the command-line flag (default ``--field-name``; a boolean that defaults to True
            becomes ``--no-field-name``).
        choices / minimum / maximum: what a value may be (checked by :func:`check`).
        above: an exclusive minimum (the value must be greater than this).
        max_items: the most items of a list field (``list[str]``).
        max_length: the most characters of a string (of each item, for a list of strings).
        cli: whether the command line offers it.
        remote: whether a client may set it through the bridge's ``load`` op.
        profile: its key in a device profile (``models/profiles.toml``), when not the field's name.
    """
    meta = {
        "help": help,
        "flag": flag,
        "choices": choices,
        "minimum": minimum,
        "maximum": maximum,
        "above": above,
        "max_items": max_items,
        "max_length": max_length,
        "cli": cli,
        "remote": remote,
        "profile": profile,
    }
    return dataclasses.field(default=default, metadata=meta)


def fields(cls) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


def value_type(cls, f: dataclasses.Field) -> tuple[type, bool]:
    """(the field's base type, whether None is allowed), from its annotation."""
    hint = typing.get_type_hints(cls)[f.name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        (base,) = (a for a in args if a is not type(None))
        return base, True
    return hint, False


def _show(value: Any) -> str:
    """``repr(value)``, cut short: a message never echoes a whole (possibly huge) value."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_value(cls, f: dataclasses.Field, value: Any, where: str) -> Any:
    base, optional = value_type(cls, f)
    name = f"{where}{f.name}"
    meta = f.metadata
    if value is None:
        if optional:
            return None
        raise UsageError(f"{name} can't be null")
    if base is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{name} must be true or false, not {_show(value)}")
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{name} must be a whole number, not {_show(value)}")
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise UsageError(f"{name} must be a finite number, not {_show(value)}")
        value = float(value)
    elif base is str:
        if not isinstance(value, str):
            raise UsageError(f"{name} must be a string, not {_show(value)}")
        _check_length(name, value, meta)
    elif base is dict or typing.get_origin(base) is dict:
        if not isinstance(value, dict):
            raise UsageError(f"{name} must be an object, not {_show(value)}")
    elif typing.get_origin(base) is list:
        (item,) = typing.get_args(base) or (Any,)
        if not isinstance(value, list) or (item is str and not all(isinstance(v, str) for v in value)):
            raise UsageError(
                f"{name} must be a list{' of strings' if item is str else ''}, not {_show(value)}"
            )
        if meta.get("max_items") is not None and len(value) > meta["max_items"]:
            raise UsageError(f"{name} may have at most {meta['max_items']} items, not {len(value)}")
        for v in value:
            _check_length(name, v, meta)
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise UsageError(f"{name} must be one of {', '.join(map(str, meta['choices']))}, not {_show(value)}")
    if meta.get("minimum") is not None and value < meta["minimum"]:
        raise UsageError(f"{name} must be at least {meta['minimum']}, not {_show(value)}")
    if meta.get("above") is not None and not value > meta["above"]:
        raise UsageError(f"{name} must be more than {meta['above']}, not {_show(value)}")
    if meta.get("maximum") is not None and value > meta["maximum"]:
        raise UsageError(f"{name} must be at most {meta['maximum']}, not {_show(value)}")
    return value


def _check_length(name: str, value: Any, meta: Mapping[str, Any]) -> None:
    if meta.get("max_length") is not None and isinstance(value, str) and len(value) > meta["max_length"]:
        raise UsageError(f"{name}: a string of at most {meta['max_length']} characters, not {len(value)}")


def check(settings: Any) -> None:
    """Raise UsageError if a field of ``settings`` is not a value its declaration allows."""
    cls = type(settings)
    for f in fields(cls):
        _check_value(cls, f, getattr(settings, f.name), "")


def from_mapping(
    cls: type[S], data: Mapping[str, Any], *, base: S | None = None, remote: bool = False, where: str = ""
) -> S:
    """``base`` (default: the defaults) with the values of ``data`` applied, each checked.

    Args:
        remote: only the fields a client may set (``setting(..., remote=True)``) are accepted.
        where: prefix for error messages (e.g. ``"load option "``).
    Raises:
        UsageError: an unknown name, a wrong type, a value out of range (naming the field).
    """
    if not isinstance(data, Mapping):
        raise UsageError(f"{where.rstrip(': ') or 'settings'} must be an object of name: value")
    known = {f.name: f for f in fields(cls) if f.metadata.get("remote", True) or not remote}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise UsageError(
            f"unknown {where or 'setting '}{', '.join(str(k)[:60] for k in unknown[:10])}; known: {', '.join(known)}"
        )
    values = {name: _check_value(cls, known[name], value, where) for name, value in data.items()}
    start = base if base is not None else cls()
    return dataclasses.replace(start, **values)


def overrides(settings: S, **values: Any) -> S:
    """``settings`` with the non-None ``values`` applied (explicit flags over a profile)."""
    given = {k: v for k, v in values.items() if v is not None}
    return from_mapping(type(settings), given, base=settings) if given else settings


def to_dict(settings: Any) -> dict[str, Any]:
    return dataclasses.asdict(settings)
