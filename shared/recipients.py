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
or stale): for a job with a category, or one that is not urgent. The copy of a part that counted its
users decides for the later ones (redeliveries waiting for retries): whom it let through keep going
(a mute or quiet hours since change nothing: no token stranded), whom it left out stay out (an unmute
since does not count a user twice). A user whose tokens or preferences cannot be read now is
``unresolved``: left out of this copy, which the bus delivers again.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from shared import instance, jobs, logs
from shared.claims import Claims, LedgerState, now_ms
from shared.preferences import Preferences, quiet_until

MINUTE_MS = 60_000
log = logs.get("recipients")


@dataclass
class Recipients:
    per_user: dict[str, list[str]]  # user -> tokens to send to
    without_tokens: int = 0
    muted: int = 0
    skipped_once: int = 0
    capped: int = 0
    unresolved: list[str] = field(default_factory=list)
    deferred: dict[int, dict[str, list[str]]] = field(default_factory=dict)  # due minute (ms) -> user -> tokens


def choose(
    job: jobs.Job,
    devices: Mapping[str, Mapping[str, str | None]],
    part: int | str,
    claims: Claims,
    *,
    at: int | None = None,
) -> Recipients:
    """Apply the per-user rules to the users whose devices were read (``devices``: user -> token ->
    platform); the job's other users are unresolved. ``claims`` reads the part's own ledger (sharded
    for an audience part). Quiet hours are judged at ``at`` (ms; default now: a deferred part is judged
    at its due time at the earliest, whatever this clock says)."""
    chosen = Recipients({}, unresolved=[u for u in job.user_ids if u not in devices])
    for user_id, user_devices in devices.items():
        tokens = [t for t, p in user_devices.items() if not job.platforms or p in job.platforms]
        if tokens:
            chosen.per_user[user_id] = tokens
    chosen.without_tokens = len(devices) - len(chosen.per_user)
    if claims.part_counted(job.id, part):
        _as_counted(job, chosen, claims)
    prefs = _preferences(chosen, wait=job.category is not None) if job.category is not None or not job.urgent else {}
    if job.category is not None:
        _unmuted(job, job.category, chosen, prefs, claims)
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
        if job.audience is None:  # an audience part is never deferred (yet): its devices are the page's
            _defer_quiet(job, chosen, prefs, now_ms() if at is None else at, claims)
    return chosen


def _as_counted(job: jobs.Job, chosen: Recipients, claims: Claims) -> None:
    """A later copy of a part whose users are counted keeps the decisions of the copy that counted them:
    a user none of whose tokens its ledger holds was left out then (under one rule, or without a device)
    and stays out, so an unmute or a freed cap slot since does not count the user twice."""
    held = _let_through(job, chosen, chosen.per_user, claims)
    for user_id in [u for u in chosen.per_user if u not in held]:
        del chosen.per_user[user_id]


def _let_through(job: jobs.Job, chosen: Recipients, users: Collection[str], claims: Claims) -> set[str]:
    """Those of ``users`` an earlier copy of the part let through: a token of theirs is in its ledger."""
    if not users:
        return set()
    entries = claims.ledger(job.id, [t for u in users for t in chosen.per_user[u]])
    return {u for u in users if any(entries[t].state is not LedgerState.ABSENT for t in chosen.per_user[u])}


def _preferences(chosen: Recipients, *, wait: bool) -> dict[str, Preferences]:
    """The preferences of the users who have devices. With ``wait`` (a job with a category: a mute must
    never be ignored), those whose preferences are unreadable (PostgreSQL down, not cached) are left out
    of this copy (unresolved); without (only quiet hours would need them), they are sent as if they had
    none: a PostgreSQL outage does not hold back every non-urgent notification."""
    users = sorted(chosen.per_user)
    prefs = instance.preference_store().for_users(users)
    unread = [u for u in users if u not in prefs]
    if unread and not wait:
        log.warning("preferences unreadable: quiet hours not checked for these users", extra={"users": len(unread)})
        return prefs
    for user_id in unread:
        del chosen.per_user[user_id]
    chosen.unresolved += unread
    return prefs


def _unmuted(
    job: jobs.Job, category: str, chosen: Recipients, prefs: Mapping[str, Preferences], claims: Claims
) -> None:
    """Leave out the users who muted ``category`` (counted). A user an earlier copy of the part let
    through (a retry waits) is not muted now: that copy's decision stands, so their tokens finish."""
    muted = [u for u in sorted(chosen.per_user) if prefs[u].mutes(category)]
    held = _let_through(job, chosen, muted, claims)
    muted = [u for u in muted if u not in held]
    for user_id in muted:
        del chosen.per_user[user_id]
    chosen.muted = len(muted)


def due_minute(until: dt.datetime) -> int:
    """The minute (epoch ms, at or after ``until``) a deferral to ``until`` is due: users whose quiet hours
    end within the same minute share one deferred part."""
    ms = int(until.timestamp() * 1000)
    return (ms + MINUTE_MS - 1) // MINUTE_MS * MINUTE_MS


def _defer_quiet(job: jobs.Job, chosen: Recipients, prefs: Mapping[str, Preferences], now: int, claims: Claims) -> None:
    """Move the users inside their quiet hours now from ``per_user`` to ``deferred``, by due minute; not
    those an earlier copy of the part let through (their tokens are in its ledger: they finish)."""
    at = dt.datetime.fromtimestamp(now / 1000, dt.UTC)
    quiet: dict[str, dt.datetime] = {}
    for user_id in sorted(chosen.per_user):
        found = prefs.get(user_id)
        hours = found.quiet_hours if found is not None else None
        until = quiet_until(hours, at) if hours is not None else None
        if until is not None:
            quiet[user_id] = until
    held = _let_through(job, chosen, list(quiet), claims)
    for user_id, until in quiet.items():
        if user_id not in held:
            chosen.deferred.setdefault(due_minute(until), {})[user_id] = chosen.per_user.pop(user_id)
