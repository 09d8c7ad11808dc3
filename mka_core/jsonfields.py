"""Reading JSON files a user may have edited: type checks that name the offending field (JSON has
no ints-vs-bools distinction Python respects) and a compact writer that keeps short lists on one
line. Used by plans (`plan`) and recipes."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from mka_core.errors import MkaInputError


def kind(value: Any) -> str:
    """How a JSON reader would name a value's type in an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value!r}" if len(value) <= 40 else "a string"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def want_int(value: Any, path: str, what: str = "an integer") -> int:
    if not is_int(value):
        raise MkaInputError(f"{path}: expected {what}, got {kind(value)}")
    return int(value)


def want_number(value: Any, path: str) -> float:
    if not is_number(value):
        raise MkaInputError(f"{path}: expected a number, got {kind(value)}")
    x = float(value)
    if not math.isfinite(x):
        raise MkaInputError(f"{path}: expected a finite number, got {x}")
    return x


def want_str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise MkaInputError(f"{path}: expected a string, got {kind(value)}")
    return value


def want_list(value: Any, path: str, what: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise MkaInputError(f"{path}: expected {what}, got {kind(value)}")
    return list(value)


def want_object(value: Any, path: str, keys: Sequence[str], required: Sequence[str]) -> dict:
    if not isinstance(value, dict):
        raise MkaInputError(f"{path}: expected a JSON object, got {kind(value)}")
    for key in value:
        if key not in keys:
            raise MkaInputError(
                f"{path}: unknown field {key!r}; expected only {', '.join(keys)}"
                if path != "plan"
                else f"unknown field {key!r} in the plan; expected only {', '.join(keys)}"
            )
    for key in required:
        if key not in value:
            where = f"{path}.{key}" if path != "plan" else key
            raise MkaInputError(f"{where}: missing")
    return value


def dumps_compact(obj: Any, indent: int = 2, level: int = 0) -> str:
    """json.dumps with indent, but short lists of scalars (and of scalar pairs) on one line."""

    def flat(x: Any) -> bool:
        return not isinstance(x, (dict, list)) or (
            isinstance(x, list) and all(not isinstance(y, (dict, list)) for y in x)
        )

    pad, inner = " " * (indent * level), " " * (indent * (level + 1))
    if isinstance(obj, dict) and obj:
        items = [
            f"{inner}{json.dumps(k)}: {dumps_compact(v, indent, level + 1)}" for k, v in obj.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and obj and not all(flat(x) for x in obj):
        items = [f"{inner}{dumps_compact(v, indent, level + 1)}" for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj, allow_nan=False)
