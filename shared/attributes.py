"""Device attributes: their rules and canonical forms, in one place. Pure Python, no I/O.

``register`` validates with these, the store keeps what they return, ``send`` validates the keys of
``localized`` (and audience filters) with them, and the message builder picks a variant with
:func:`select_variant`. Each check raises :class:`AttributeRuleError` with a message naming the rule
(the caller adds the field's name).

- **locale**: a BCP 47 tag of a language (2 or 3 letters), an optional script (4 letters) and an
  optional region (2 letters or 3 digits): ``de``, ``de-AT``, ``zh-Hans-CN``, ``es-419``. ``_`` is
  accepted for ``-`` (``en_US``, as Android and Java write it). Canonical case: language lower,
  script title, region upper (``zh-Hans-CN``, ``pt-BR``).
- **time zone**: an IANA name the zone database knows (``Europe/Berlin``, ``UTC``), exactly as spelled
  there (names are case-sensitive). ``tzdata`` is pinned so every instance knows the same names.
- **app version**: one to four dot-separated whole numbers without leading zeros, each 0-999,999
  (``2``, ``2.3``, ``2.3.10``), compared numerically with missing parts counting as 0:
  :func:`version_key` maps one to an integer that sorts the same way (``2.10`` > ``2.9``,
  ``2.3`` == ``2.3.0``). PostgreSQL keeps that integer beside the text (``device_tokens.app_version_key``,
  ``NUMERIC(24,0)``), so SQL compares versions with ``app_version_key >= CAST(:min AS numeric)``
  given ``str(version_key(min))``.
"""

from __future__ import annotations

import functools
import re
import zoneinfo
from collections.abc import Container

__all__ = [
    "MAX_APP_VERSION_PART",
    "AttributeRuleError",
    "canonical_locale",
    "check_app_version",
    "check_time_zone",
    "locale_chain",
    "locale_matches",
    "select_variant",
    "version_key",
]

MAX_APP_VERSION_PART = 999_999
APP_VERSION_PARTS = 4
LOCALE_RULE = "a BCP 47 locale: language, optional script and region (de, de-AT, zh-Hans-CN, es-419)"
TIME_ZONE_RULE = "an IANA time zone name (Europe/Berlin, America/New_York, UTC)"
APP_VERSION_RULE = "1 to 4 dot-separated whole numbers without leading zeros, each 0-999999 (2, 2.3, 2.3.10)"

_LOCALE = re.compile(r"([A-Za-z]{2,3})(?:[-_]([A-Za-z]{4}))?(?:[-_]([A-Za-z]{2}|[0-9]{3}))?")
_PART = r"(?:0|[1-9][0-9]{0,5})"
_APP_VERSION = re.compile(rf"{_PART}(?:\.{_PART}){{0,{APP_VERSION_PARTS - 1}}}")
_MAX_TIME_ZONE_CHARS = 64


class AttributeRuleError(ValueError):
    """A value breaks an attribute's rule; the message says which rule (never more than 100 characters of it)."""


def _shown(value: object) -> str:
    if isinstance(value, str):
        return repr(value) if len(value) <= 100 else f"a string of {len(value)} characters"
    return "null" if value is None else type(value).__name__


def canonical_locale(value: object) -> str:
    """The canonical form of a locale (``en_us`` -> ``en-US``), or AttributeRuleError."""
    match = _LOCALE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise AttributeRuleError(f"must be {LOCALE_RULE}, got {_shown(value)}")
    language, script, region = match.groups()
    tag = language.lower()
    if script:
        tag += "-" + script.title()
    if region:
        tag += "-" + region.upper()
    return tag


def locale_chain(locale: str) -> list[str]:
    """A canonical locale and its shortenings, subtag by subtag: ``zh-Hans-CN`` -> ``zh-Hans``, ``zh``."""
    chain = [locale]
    while "-" in locale:
        locale = locale.rsplit("-", 1)[0]
        chain.append(locale)
    return chain


def select_variant(locale: str | None, variants: Container[str]) -> str | None:
    """The key of ``variants`` (canonical locales) a device of ``locale`` takes: its own, else its
    locale shortened subtag by subtag (never a sibling region); None when none applies."""
    if locale is None:
        return None
    for tag in locale_chain(locale):
        if tag in variants:
            return tag
    return None


def locale_matches(tag: str, locale: str | None) -> bool:
    """Whether a device of ``locale`` matches the filter ``tag`` (both canonical): it equals the tag
    or extends it by subtags (``de`` matches ``de-AT``; ``de-AT`` does not match ``de``). In SQL:
    ``locale = :tag OR locale LIKE :tag || '-%'`` (a canonical tag holds no ``%`` or ``_``)."""
    return locale is not None and (locale == tag or locale.startswith(tag + "-"))


# Names a system's zone directory may hold that are no IANA zone of their own (the machine's own zone,
# the "no zone" placeholder, a rules template): refused.
_NOT_ZONES = frozenset({"localtime", "Factory", "posixrules"})


@functools.cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones()) - _NOT_ZONES


def check_time_zone(value: object) -> str:
    """An IANA time zone name the zone database knows, or AttributeRuleError."""
    if not isinstance(value, str) or len(value) > _MAX_TIME_ZONE_CHARS or value not in _zones():
        raise AttributeRuleError(f"must be {TIME_ZONE_RULE}, got {_shown(value)}")
    return value


def check_app_version(value: object) -> str:
    """An app version (``2.3.10``), or AttributeRuleError."""
    if not isinstance(value, str) or not _APP_VERSION.fullmatch(value):
        raise AttributeRuleError(f"must be {APP_VERSION_RULE}, got {_shown(value)}")
    return value


def version_key(version: str) -> int:
    """An integer that orders app versions numerically, missing parts counting as 0 (each part
    takes six decimal digits: ``2.3`` -> 2_000003_000000_000000). Checks the version first."""
    parts = [int(p) for p in check_app_version(version).split(".")]
    parts += [0] * (APP_VERSION_PARTS - len(parts))
    key = 0
    for part in parts:
        key = key * (MAX_APP_VERSION_PART + 1) + part
    return key
