"""Field values of the run config: a JSON value or a command-line string becomes the field's type.

Each function raises ``ValueError`` naming what the field expects; ``RunConfig.from_flat`` collects
those messages into one ``ConfigError``.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Literal


def choices(tp: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal`` field type, else None."""
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def split_commas(value: Any) -> Any:
    """``"a, b"`` or ``["a,b", "c"]`` (a JSON list, or several command-line values) -> ``["a", "b", "c"]``;
    null stays null (an empty list); anything else is left for the type check to report."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        return value
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def parse_overrides(tokens: list[str], table: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    """``--key value`` pairs (list fields take every value up to the next flag); values stay strings."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--"):
            problems.append(f"unexpected argument {token!r} (flags are --field value)")
            index += 1
            continue
        key, _, inline = token[2:].partition("=")
        key = key.replace("-", "_")
        index += 1
        taken: list[str] = [inline] if inline else []
        while index < len(tokens) and not tokens[index].startswith("--"):
            taken.append(tokens[index])
            index += 1
        tp = table.get(key, (None, None))[1]
        if is_list(tp):
            values[key] = taken
        elif len(taken) == 1:
            values[key] = taken[0]
        elif not taken and _base(tp) is bool:
            values[key] = "true"
        else:
            problems.append(f"--{key} takes one value, got {len(taken)}")
    if problems:
        raise ValueError("invalid command line: " + "; ".join(problems))
    return values


def _base(tp: Any) -> Any:
    """Strip ``X | None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def is_list(tp: Any) -> bool:
    return typing.get_origin(_base(tp)) is list


def coerce(value: Any, tp: Any) -> Any:
    """Convert a JSON value or a command-line string to ``tp``; raise ValueError naming the expectation."""
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("null", "none")):
        if optional:
            return None
        raise ValueError("must not be null")
    base = _base(tp)
    allowed = choices(base)
    if allowed is not None:
        for choice in allowed:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ValueError(f"must be one of {list(allowed)}, got {value!r}")
    if is_list(base) and typing.get_origin(typing.get_args(base)[0]) is dict:
        return _coerce_objects(value)
    if typing.get_origin(base) is dict:
        return _coerce_object(value)
    if is_list(base):
        if isinstance(value, str):
            value = [value]
        # Numbers are allowed so a blend's weights can be JSON numbers: ["0.8", "data/zh"] or [0.8, "data/zh"].
        if not isinstance(value, list) or not all(
                isinstance(item, str) or (isinstance(item, (int, float)) and not isinstance(item, bool))
                for item in value):
            raise ValueError(f"must be a list of strings, got {value!r}")
        return [item if isinstance(item, str) else repr(item) for item in value]
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"must be true or false, got {value!r}")
    if base in (int, float):
        return _coerce_number(value, base)
    if base is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"must be a string, got {value!r}")
    raise AssertionError(f"unsupported field type {tp}")


def _coerce_objects(value: Any) -> list[dict[str, Any]]:
    """A list of JSON objects (``phases``): from JSON as is, from the command line as one JSON string."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"must be a JSON list of objects, got {value[:60]!r} ({error})") from None
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ValueError(f"must be a list of JSON objects, got {json.dumps(value)[:80]}")
    return [dict(item) for item in value]


def _coerce_object(value: Any) -> dict[str, Any]:
    """A JSON object, or its text (the command line's spelling: --rope_scaling '{"rope_type": ...}')."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"must be a JSON object, got {value[:80]!r} ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"must be a JSON object, got {json.dumps(value)[:80]}")
    return dict(value)


def _coerce_number(value: Any, base: type) -> int | float:
    """An int or float field from JSON or the command line; ``True`` and ``2.5`` are not integers."""
    expected = "an integer" if base is int else "a number"
    if isinstance(value, str):
        try:
            value = base(value)
        except ValueError:
            raise ValueError(f"must be {expected}, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be {expected}, got {value!r}")
    if base is int and not float(value).is_integer():
        raise ValueError(f"must be {expected}, got {value!r}")
    return base(value)
