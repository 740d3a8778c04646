"""A job's ``audience``: which registered devices it reaches instead of a list of users. Pure Python.

``{"all": true}``, or a non-empty combination of filters, all of which a device must match:

- ``platforms``: a non-empty list of distinct platforms;
- ``locales``: a non-empty list of distinct locales (canonical form, ``shared.attributes``); a filter tag
  matches a device whose locale equals it or extends it by subtags (``de`` matches ``de-AT``,
  ``zh-Hans`` matches ``zh-Hans-CN``; ``de-AT`` does not match ``de``);
- ``app_version``: ``{"min": "2.3", "below": "4"}``, at least one of them, ``min`` inclusive, ``below``
  exclusive, ``min`` < ``below``, compared numerically;
- ``time_zones``: a non-empty list of distinct IANA zone names;
- ``active_within_days``: a whole number 1-3,650: the device registered (``updated_at``) within that
  many days of the expansion's start.

A device without the attribute a filter names does not match that filter. :func:`parse` returns the
canonical form (the job carries it as is); every rule failure is an ``AudienceError`` naming the field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from shared.attributes import AttributeRuleError, canonical_locale, check_app_version, check_time_zone, version_key

FILTERS = ("platforms", "locales", "app_version", "time_zones", "active_within_days")
FIELDS = ("all", *FILTERS)
MAX_LIST = 100  # locales or time zones in one filter
MAX_DAYS = 3650


class AudienceError(ValueError):
    """An audience breaks a rule; the message names the field (``audience.locales[1]``)."""


def _list(value: object, path: str, item: Callable[[object, str], str]) -> list[str]:
    if not isinstance(value, list | tuple) or not value:
        raise AudienceError(f"{path} must be a non-empty list")
    if len(value) > MAX_LIST:
        raise AudienceError(f"{path} has {len(value)} entries; at most {MAX_LIST} are allowed")
    out: list[str] = []
    for i, raw in enumerate(value):
        checked = item(raw, f"{path}[{i}]")
        if checked in out:
            raise AudienceError(f"{path}[{i}] repeats {checked!r}")
        out.append(checked)
    return out


def _rule(check: Callable[[object], str]) -> Callable[[object, str], str]:
    def item(value: object, path: str) -> str:
        try:
            return check(value)
        except AttributeRuleError as exc:
            raise AudienceError(f"{path} {exc}") from None

    return item


def _platform(platforms: Sequence[str]) -> Callable[[object, str], str]:
    def item(value: object, path: str) -> str:
        if not isinstance(value, str) or value not in platforms:
            raise AudienceError(f"{path} must be one of {', '.join(repr(p) for p in platforms)}")
        return value

    return item


def _app_version(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping) or not value:
        raise AudienceError('audience.app_version must be an object with "min", "below" or both')
    unknown = [k for k in value if k not in ("min", "below")]
    if unknown:
        raise AudienceError(f"unknown field audience.app_version.{unknown[0]}; allowed: min, below")
    out = {bound: _rule(check_app_version)(value[bound], f"audience.app_version.{bound}") for bound in value}
    if "min" in out and "below" in out and version_key(out["min"]) >= version_key(out["below"]):
        raise AudienceError("audience.app_version.min must be below audience.app_version.below")
    return {bound: out[bound] for bound in ("min", "below") if bound in out}


def _days(value: object) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DAYS:
        raise AudienceError(f"audience.active_within_days must be a whole number from 1 to {MAX_DAYS}")
    return value


def parse(value: object, platforms: Sequence[str]) -> dict[str, Any]:
    """The canonical audience (``{"all": True}`` or its filters in ``FILTERS`` order), or AudienceError."""
    if not isinstance(value, Mapping):
        raise AudienceError('audience must be an object: {"all": true} or filters')
    unknown = [k for k in value if k not in FIELDS]
    if unknown:
        raise AudienceError(f"unknown field audience.{unknown[0]}; allowed in audience: {', '.join(FIELDS)}")
    if "all" in value:
        if value["all"] is not True:
            raise AudienceError("audience.all must be true (to reach only some devices, name filters instead)")
        if len(value) > 1:
            other = next(k for k in value if k != "all")
            raise AudienceError(f"audience.all cannot be combined with a filter (audience.{other})")
        return {"all": True}
    if not value:
        raise AudienceError(f'audience must be {{"all": true}} or name at least one filter: {", ".join(FILTERS)}')
    out: dict[str, Any] = {}
    if "platforms" in value:
        chosen = _list(value["platforms"], "audience.platforms", _platform(platforms))
        out["platforms"] = [p for p in platforms if p in chosen]
    if "locales" in value:
        out["locales"] = _list(value["locales"], "audience.locales", _rule(canonical_locale))
    if "app_version" in value:
        out["app_version"] = _app_version(value["app_version"])
    if "time_zones" in value:
        out["time_zones"] = _list(value["time_zones"], "audience.time_zones", _rule(check_time_zone))
    if "active_within_days" in value:
        out["active_within_days"] = _days(value["active_within_days"])
    return out
