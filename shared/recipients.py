"""Who of a part's users gets the notification, and on which devices: the per-user rules of ``deliver``.

Per user, in this order, each user counted under at most one of them:
  no device of the job's platforms   (``users.without_tokens``)
  the job's category muted           (``users.muted``; a job without a category is never muted,
                                      and ``urgent`` does not bypass a mute)
  ``once`` already used              (``users.skipped_once``)
  over the daily cap                 (``users.capped``; urgent jobs are neither capped nor counted)
  inside quiet hours                 (deferred: ``deferred``, user -> tokens, by the minute the quiet
                                      hours end; ``urgent`` bypasses them; ``shared/deferral.py``)
Preferences are read here, when the part is delivered (the cache, rebuilt from PostgreSQL when missing
or stale): for a job with a category, or one that is not urgent. A user whose tokens or preferences
cannot be read now is ``unresolved``: left out of this copy, which the bus delivers again.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field

from shared import instance, jobs
from shared.claims import now_ms
from shared.preferences import Preferences, quiet_until

MINUTE_MS = 60_000


@dataclass
class Recipients:
    per_user: dict[str, list[str]]  # user -> tokens to send to
    without_tokens: int = 0
    muted: int = 0
    skipped_once: int = 0
    capped: int = 0
    unresolved: list[str] = field(default_factory=list)
    deferred: dict[int, dict[str, list[str]]] = field(default_factory=dict)  # due minute (ms) -> user -> tokens


def choose(job: jobs.Job, devices: Mapping[str, Mapping[str, str | None]], *, at: int | None = None) -> Recipients:
    """Apply the per-user rules to the users whose devices were read (``devices``: user -> token ->
    platform); the job's other users are unresolved. Quiet hours are judged at ``at`` (ms; default now:
    a deferred part is judged at its due time at the earliest, whatever this clock says)."""
    chosen = Recipients({}, unresolved=[u for u in job.user_ids if u not in devices])
    for user_id, user_devices in devices.items():
        tokens = [t for t, p in user_devices.items() if not job.platforms or p in job.platforms]
        if tokens:
            chosen.per_user[user_id] = tokens
    chosen.without_tokens = len(devices) - len(chosen.per_user)
    prefs = _preferences(job, chosen) if job.category is not None or not job.urgent else {}
    if job.category is not None:
        _unmuted(job.category, chosen, prefs)
    claims = instance.claims()
    if job.once:
        allowed, skipped = claims.claim_once(job.id, job.once, sorted(chosen.per_user))
        chosen.per_user = {u: chosen.per_user[u] for u in allowed}
        chosen.skipped_once = len(skipped)
    if not job.urgent:
        allowed, capped = instance.daily_cap().claim(job.id, sorted(chosen.per_user), now_ms())
        chosen.per_user = {u: chosen.per_user[u] for u in allowed}
        chosen.capped = len(capped)
        if job.once and capped:  # it did not reach them: their one-time claim is not used up
            claims.release_once(job.id, job.once, capped)
        _defer_quiet(chosen, prefs, now_ms() if at is None else at)
    return chosen


def _preferences(job: jobs.Job, chosen: Recipients) -> dict[str, Preferences]:
    """The preferences of the users who have devices; those whose preferences are unreadable are left
    out of this copy (unresolved)."""
    users = sorted(chosen.per_user)
    prefs = instance.preference_store().for_users(users)
    unread = [u for u in users if u not in prefs]
    for user_id in unread:
        del chosen.per_user[user_id]
    chosen.unresolved += unread
    return prefs


def _unmuted(category: str, chosen: Recipients, prefs: Mapping[str, Preferences]) -> None:
    """Leave out the users who muted ``category`` (counted)."""
    muted = [u for u in sorted(chosen.per_user) if prefs[u].mutes(category)]
    for user_id in muted:
        del chosen.per_user[user_id]
    chosen.muted = len(muted)


def due_minute(until: dt.datetime) -> int:
    """The minute (epoch ms, at or after ``until``) a deferral to ``until`` is due: users whose quiet hours
    end within the same minute share one deferred part."""
    ms = int(until.timestamp() * 1000)
    return (ms + MINUTE_MS - 1) // MINUTE_MS * MINUTE_MS


def _defer_quiet(chosen: Recipients, prefs: Mapping[str, Preferences], now: int) -> None:
    """Move the users inside their quiet hours now from ``per_user`` to ``deferred``, by due minute."""
    at = dt.datetime.fromtimestamp(now / 1000, dt.UTC)
    for user_id in sorted(chosen.per_user):
        quiet = prefs[user_id].quiet_hours
        until = quiet_until(quiet, at) if quiet is not None else None
        if until is not None:
            chosen.deferred.setdefault(due_minute(until), {})[user_id] = chosen.per_user.pop(user_id)
