"""How error messages name a decoded JSON value's type ("a string", "an object", ...), for every module
that validates JSON input (jobs, preferences) without either importing the other."""

from __future__ import annotations

from collections.abc import Mapping


def type_name(value: object) -> str:
    """How an error message names a JSON value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__
