"""Local-time sends (``send_at_local``): the UTC instants a wall-clock time maps to. Pure, no I/O.

A local time without offset (``2026-12-24T09:00``) happens at a different instant in each time zone,
computed with that zone's rules for that date (daylight saving included, ``zoneinfo`` and the pinned
``tzdata``):

- a local time that does not exist there (the hour skipped when clocks go forward) moves forward to
  the first one that does (the end of the gap: 02:30 on a day 02:00 jumps to 03:00 is 03:00);
- one that occurs twice (the hour repeated when clocks go back) is the first of the two.

Each distinct instant over all the zones the database knows is one **slot**; a device belongs to the
slot of its own zone (``time_zone`` given at register), or of the job's ``default_time_zone``.
"""

from __future__ import annotations

import functools
import zoneinfo
from datetime import UTC, datetime, timedelta

_SECOND = timedelta(seconds=1)


@functools.cache
def _zone(name: str) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(name)


@functools.cache
def all_zones() -> tuple[str, ...]:
    return tuple(sorted(zoneinfo.available_timezones()))


def instant(local: datetime, zone: str) -> datetime:
    """The UTC instant of the naive wall-clock time ``local`` in ``zone`` (gaps forward, folds first)."""
    tz = _zone(zone)
    first = local.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if first.astimezone(tz).replace(tzinfo=None) == local:
        return first  # it exists (the first of two when it occurs twice)
    # A gap: the instant before (fold=1 reads it with the later offset) and after it bracket the
    # transition; the first instant whose wall-clock time is past ``local`` is the end of the gap.
    low, high = local.replace(tzinfo=tz, fold=1).astimezone(UTC), first
    low, high = min(low, high), max(low, high)
    while high - low > _SECOND:
        middle = low + (high - low) / 2
        if middle.astimezone(tz).replace(tzinfo=None) >= local:
            high = middle
        else:
            low = middle
    return high.replace(microsecond=0)  # transitions fall on whole seconds: the one in [low, high]


@functools.lru_cache(maxsize=64)
def slots(local: datetime) -> dict[datetime, frozenset[str]]:
    """Every distinct instant ``local`` maps to over all the known zones, with the zones of each, in
    time order."""
    found: dict[datetime, set[str]] = {}
    for zone in all_zones():
        found.setdefault(instant(local, zone), set()).add(zone)
    return {at: frozenset(found[at]) for at in sorted(found)}


def slot_of(local: datetime, zone: str | None, default_zone: str) -> datetime:
    """The instant a device of ``zone`` (None: ``default_zone``) gets a job for ``local``."""
    return instant(local, zone or default_zone)
