"""One reading of loosely typed values (command-line strings, YAML, JSON) as the types a dataclass declares.

Mixer options and recipe keys both go through `coerce`, so a value means the same wherever it is written.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

from .errors import LinearizeError

TRUE_WORDS = ("true", "yes", "1")
FALSE_WORDS = ("false", "no", "0")
NONE_WORDS = ("none", "null")


def _parse(text: str, hint: type, where: str) -> Any:
    """A string read as the int, float or bool that `hint` names."""
    if hint is bool:
        if text.lower() in TRUE_WORDS:
            return True
        if text.lower() in FALSE_WORDS:
            return False
        raise LinearizeError(f"{where} must be true or false, got {text!r}")
    try:
        return hint(text)
    except ValueError:
        raise LinearizeError(f"{where} must be a {hint.__name__}, got {text!r}") from None


def coerce(value: Any, hint: Any, where: str, nested: Callable[[type, Any, str], Any] | None = None) -> Any:
    """`value` as the type `hint` declares, or a one-line LinearizeError that names `where`.

    Strings are read as a declared int, float or bool (true/false, yes/no, 1/0), and "none" or "null" as None
    where None is allowed and the field is not text; an int widens to a float; a bool is never an int.
    `nested(cls, value, where)` builds a field whose type is a dataclass (a recipe section) from a mapping.

    >>> coerce("4", int | None, "option 'window'")
    4
    >>> coerce(True, int, "option 'window'")
    Traceback (most recent call last):
    ...
    linearize.hf.errors.LinearizeError: option 'window' must be a int, got True
    """
    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = next(a for a in args if a is not type(None))
        if type(None) in args and (value is None or (inner is not str and isinstance(value, str) and value.lower() in NONE_WORDS)):
            return None
        return coerce(value, inner, where, nested)
    if dataclasses.is_dataclass(hint) and nested is not None:
        return nested(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise LinearizeError(f"{where} must be a list, got {value!r}")
        return [coerce(v, args[0], f"{where}[{i}]", nested) if args else v for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise LinearizeError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if isinstance(value, str) and hint in (int, float, bool):
        return _parse(value, hint, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise LinearizeError(f"{where} must be a {hint.__name__}, got {value!r}")
    return value
