"""Text templates with ``{name}`` placeholders, parsed and filled safely. Pure Python, no I/O.

A template holds ``{field}`` placeholders with plain field names only (``[A-Za-z_][A-Za-z0-9_]*``);
``{{`` and ``}}`` are literal braces. It is parsed by the tiny parser below, never by ``str.format``,
so a value can neither reach attributes (``{x.__class__}``) nor be expanded again: values are
strings, numbers or booleans, written out without calling any method they may override.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "FIELD_NAME_PATTERN",
    "Field",
    "MissingField",
    "NotScalar",
    "Part",
    "TemplateError",
    "clip",
    "field_names",
    "fill",
    "literal_text",
    "parse",
    "scalar_text",
]

FIELD_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"

_NAME_RE = re.compile(FIELD_NAME_PATTERN)
_BRACE_RE = re.compile(r"[{}]")
_SPECIALS = {
    ".": "uses attribute access",
    "[": "uses indexing",
    "!": "uses a conversion (!r/!s/!a)",
    ":": "uses a format spec",
    "{": "has a nested brace",
}


@dataclass(frozen=True)
class Field:
    """A ``{name}`` placeholder."""

    name: str


Part = str | Field


class TemplateError(ValueError):
    """The template is not allowed; the message says why (it reads after the template's name)."""


class MissingField(KeyError):
    """The data has no value for a placeholder's field."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class NotScalar(TypeError):
    """A placeholder's value is not a string, number or boolean."""

    def __init__(self, name: str, value: object) -> None:
        super().__init__(name)
        self.name = name
        self.value = value


def clip(text: str, limit: int = 60) -> str:
    """``text`` shortened for a message."""
    return text if len(text) <= limit else text[:limit] + "..."


def _placeholder_problem(inner: str) -> str:
    shown = "{" + clip(inner) + "}"
    found = [(inner.find(c), c) for c in _SPECIALS if c in inner]
    if found:
        what = _SPECIALS[min(found)[1]]
    elif inner == "" or inner.isdigit():
        what = "is a positional field"
    else:
        what = "is not a plain field name"
    return (
        f"placeholder {shown} {what}; only plain field names are allowed "
        "(letters, digits and _, not starting with a digit, e.g. {order_id}); write {{ and }} for literal braces"
    )


def _field_at(text: str, j: int) -> tuple[Field, int]:
    """The placeholder opening at ``text[j] == "{"`` and the index after its ``}``."""
    end = text.find("}", j + 1)
    if end < 0:
        raise TemplateError(
            f"has an unclosed '{{' at character {j + 1} ({clip(text[j:], 20)!r}); write {{{{ for a literal brace"
        )
    inner = text[j + 1 : end]
    if not _NAME_RE.fullmatch(inner):
        raise TemplateError(_placeholder_problem(inner))
    return Field(inner), end + 1


@lru_cache(maxsize=4096)
def parse(text: str) -> tuple[Part, ...]:
    """Split a template into literal text and fields. Raises TemplateError for anything but ``{name}``."""
    parts: list[Part] = []
    literal: list[str] = []
    i = 0
    while (match := _BRACE_RE.search(text, i)) is not None:
        j = match.start()
        literal.append(text[i:j])
        if text.startswith(text[j], j + 1):  # "{{" or "}}": one literal brace
            literal.append(text[j])
            i = j + 2
            continue
        if text[j] == "}":
            raise TemplateError(f"has a single '}}' at character {j + 1}; write }}}} for a literal brace")
        field, i = _field_at(text, j)
        parts += ["".join(literal), field]
        literal = []
    literal.append(text[i:])
    parts.append("".join(literal))
    return tuple(p for p in parts if p != "")


def literal_text(parts: tuple[Part, ...]) -> str:
    """The template's fixed text (its fields left out)."""
    return "".join(p for p in parts if isinstance(p, str))


def field_names(parts: tuple[Part, ...]) -> list[str]:
    """The template's field names, in order."""
    return [p.name for p in parts if isinstance(p, Field)]


def scalar_text(value: object) -> str | None:
    """The text of a string, int, float or bool (without calling any overridden method); else None."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        try:
            return int.__repr__(value)
        except ValueError:  # more digits than Python will print
            return None
    if isinstance(value, float):
        return float.__repr__(value)
    return None


def fill(parts: tuple[Part, ...], data: Mapping) -> str:
    """The template with each field replaced by its value's text, inserted once (never expanded again).

    Raises MissingField or NotScalar naming the field.
    """
    out: list[str] = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
            continue
        if part.name not in data:
            raise MissingField(part.name)
        text = scalar_text(data[part.name])
        if text is None:
            raise NotScalar(part.name, data[part.name])
        out.append(text)
    return "".join(out)
