"""A user's notification preferences: what they muted and when they sleep. Pure Python, no I/O.

The document a user reads and replaces with ``GET`` / ``PUT /preferences`` on ``register``::

    {"muted_categories": ["marketing"], "quiet_hours": {"start": "22:00", "end": "07:00",
     "time_zone": "Europe/Berlin"}}

Both keys are optional (absent: nothing muted, no quiet hours; ``quiet_hours`` may also be
``null``). :func:`parse` validates a body and names the field at fault; :class:`Preferences` is
what the store keeps and what ``deliver`` decides with. Quiet hours are the interval [start, end)
of wall-clock time in their zone, crossing midnight when end < start; :func:`quiet_until` says
whether an instant falls inside and when they end (``shared/preference_store.py`` stores them).
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.attributes import AttributeRuleError, check_time_zone
from shared.json_types import type_name

__all__ = [
    "CATEGORY_PATTERN",
    "MAX_MUTED_CATEGORIES",
    "InvalidPreferences",
    "Preferences",
    "QuietHours",
    "from_document",
    "parse",
    "quiet_until",
]

CATEGORY_PATTERN = r"^[a-z0-9_.-]{1,64}$"  # a job's `category` follows the same rule
MAX_MUTED_CATEGORIES = 100
FIELDS = ("muted_categories", "quiet_hours")
QUIET_FIELDS = ("start", "end", "time_zone")

_CATEGORY = re.compile(CATEGORY_PATTERN)
_TIME = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")


class InvalidPreferences(ValueError):
    """A body that is no valid preferences document; ``field`` is the path at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class QuietHours:
    start: dt.time
    end: dt.time
    time_zone: str

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.time_zone)

    def to_json(self) -> dict[str, str]:
        return {"start": self.start.strftime("%H:%M"), "end": self.end.strftime("%H:%M"), "time_zone": self.time_zone}


@dataclass(frozen=True)
class Preferences:
    muted_categories: tuple[str, ...] = ()
    quiet_hours: QuietHours | None = None

    def mutes(self, category: str | None) -> bool:
        """Whether a notification of ``category`` is muted (a notification without one never is)."""
        return category is not None and category in self.muted_categories

    def to_json(self) -> dict[str, Any]:
        """The public document (what GET answers and PUT echoes)."""
        quiet = self.quiet_hours.to_json() if self.quiet_hours is not None else None
        return {"muted_categories": list(self.muted_categories), "quiet_hours": quiet}


NOTHING = Preferences()


# --- validation ---------------------------------------------------------------------------------


def _no_unknown(obj: Mapping, allowed: tuple[str, ...], path: str) -> None:
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        first = unknown[0]
        name = f"{path}.{first}" if path else str(first)
        shown = name if len(name) <= 100 else name[:100] + "..."
        where = f"in {path}" if path else "here"
        raise InvalidPreferences(name, f"unknown field {shown!r}; allowed {where}: {', '.join(allowed)}")


def _categories(value: object) -> tuple[str, ...]:
    path = "muted_categories"
    if not isinstance(value, list):
        raise InvalidPreferences(path, f"{path} must be a list of category names, got {type_name(value)}")
    if len(value) > MAX_MUTED_CATEGORIES:
        raise InvalidPreferences(path, f"{path} has {len(value)} entries; at most {MAX_MUTED_CATEGORIES}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not _CATEGORY.fullmatch(item):
            raise InvalidPreferences(
                f"{path}[{i}]", f"{path}[{i}] must be 1 to 64 characters of a-z 0-9 _ . - (got {type_name(item)})"
            )
        if item in value[:i]:
            raise InvalidPreferences(f"{path}[{i}]", f"{path}[{i}] repeats {item!r}")
    return tuple(value)


def _clock(obj: Mapping, name: str) -> dt.time:
    path = f"quiet_hours.{name}"
    if name not in obj:
        raise InvalidPreferences(path, f"{path} is required (quiet_hours needs start, end and time_zone)")
    value = obj[name]
    if not isinstance(value, str) or not _TIME.fullmatch(value):
        raise InvalidPreferences(path, f'{path} must be a 24-hour time "HH:MM" (e.g. "22:00"), got {type_name(value)}')
    return dt.time(int(value[:2]), int(value[3:]))


def _time_zone(value: object) -> str:
    path = "quiet_hours.time_zone"
    try:
        return check_time_zone(value)
    except AttributeRuleError as exc:
        raise InvalidPreferences(path, f"{path} {exc}") from None


def _quiet_hours(value: object) -> QuietHours | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidPreferences("quiet_hours", f"quiet_hours must be an object (or null), got {type_name(value)}")
    _no_unknown(value, QUIET_FIELDS, "quiet_hours")
    start, end = _clock(value, "start"), _clock(value, "end")
    if "time_zone" not in value:
        raise InvalidPreferences("quiet_hours.time_zone", "quiet_hours.time_zone is required")
    zone = _time_zone(value["time_zone"])
    if start == end:
        raise InvalidPreferences("quiet_hours.end", "quiet_hours.end must differ from quiet_hours.start")
    return QuietHours(start, end, zone)


def parse(body: object) -> Preferences:
    """A PUT body, validated: InvalidPreferences names the first field at fault."""
    if not isinstance(body, Mapping):
        raise InvalidPreferences("", f"the request body must be a JSON object, got {type_name(body)}")
    _no_unknown(body, FIELDS, "")
    muted = _categories(body["muted_categories"]) if "muted_categories" in body else ()
    quiet = _quiet_hours(body.get("quiet_hours"))
    return Preferences(muted, quiet)


def from_document(document: Mapping[str, Any]) -> Preferences:
    """A document this service stored (trusted: validated when it was written)."""
    quiet = document.get("quiet_hours")
    return Preferences(
        tuple(document.get("muted_categories") or ()),
        QuietHours(dt.time.fromisoformat(quiet["start"]), dt.time.fromisoformat(quiet["end"]), quiet["time_zone"])
        if quiet
        else None,
    )


# --- quiet hours in time --------------------------------------------------------------------------


def _instant(day: dt.date, wall: dt.time, zone: zoneinfo.ZoneInfo) -> dt.datetime:
    """The instant ``wall`` o'clock on ``day`` in ``zone``: a wall time that occurs twice is its first
    occurrence; one that does not exist (a daylight-saving gap) moves forward to the first that does."""
    local = dt.datetime.combine(day, wall, tzinfo=zone)
    naive = local.replace(tzinfo=None)
    if local.astimezone(dt.UTC).astimezone(zone).replace(tzinfo=None) == naive:
        return local.astimezone(dt.UTC)
    # In a gap: read with the offset after it the wall time lies before the change, with the offset
    # before it after the change; the change (whole seconds) is the first instant at or after the wall time.
    low = int(local.replace(fold=1).timestamp())
    high = int(local.replace(fold=0).timestamp())
    while high - low > 1:
        middle = (low + high) // 2
        if dt.datetime.fromtimestamp(middle, zone).replace(tzinfo=None) >= naive:
            high = middle
        else:
            low = middle
    return dt.datetime.fromtimestamp(high, dt.UTC)


def quiet_until(quiet: QuietHours, at: dt.datetime) -> dt.datetime | None:
    """When the quiet hours that hold at ``at`` end (a UTC instant after ``at``), or None when ``at`` is
    outside them. Inside means start <= the wall-clock time at ``at`` in the zone < end (or, when they
    cross midnight, at or after start or before end)."""
    zone = quiet.zone
    local = at.astimezone(zone)
    wall = local.time().replace(tzinfo=None)
    if quiet.start < quiet.end:
        inside = quiet.start <= wall < quiet.end
        end_day = local.date()
    else:
        inside = wall >= quiet.start or wall < quiet.end
        end_day = local.date() + dt.timedelta(days=1) if wall >= quiet.start else local.date()
    if not inside:
        return None
    end = _instant(end_day, quiet.end, zone)
    if end <= at:  # the end's first occurrence is behind us (inside a repeated hour): its second one
        end = dt.datetime.combine(end_day, quiet.end, tzinfo=zone).replace(fold=1).astimezone(dt.UTC)
    return end
