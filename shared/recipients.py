"""Who of a part's users gets the notification, and on which devices: the per-user rules of ``deliver``.

Per user, in this order, each user counted under at most one of them:
  no device of the job's platforms   (``users.without_tokens``)
  the job's category muted           (``users.muted``; a job without a category is never muted,
                                      and ``urgent`` does not bypass a mute)
  ``once`` already used              (``users.skipped_once``)
  over the daily cap                 (``users.capped``; urgent jobs are neither capped nor counted)
Preferences are read here, when the part is delivered (the cache, rebuilt from PostgreSQL when missing
or stale), and only for a job with a category. The copy of a part that counted its users decides for the
later ones (redeliveries waiting for retries): whom it let through keep going, whom it left out stay out
(a mute or an unmute since changes neither: no token stranded, no user counted twice). A user whose tokens
or preferences cannot be read now is ``unresolved``: left out of this copy, which the bus delivers again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from shared import instance, jobs
from shared.claims import Claims, LedgerState, now_ms


@dataclass
class Recipients:
    per_user: dict[str, list[str]]  # user -> tokens to send to
    without_tokens: int = 0
    muted: int = 0
    skipped_once: int = 0
    capped: int = 0
    unresolved: list[str] = field(default_factory=list)


def choose(job: jobs.Job, devices: Mapping[str, Mapping[str, str | None]], part: int, claims: Claims) -> Recipients:
    """Apply the per-user rules to the users whose devices were read (``devices``: user -> token ->
    platform); the job's other users are unresolved. ``claims`` reads the part's own ledger (sharded
    for an audience part)."""
    chosen = Recipients({}, unresolved=[u for u in job.user_ids if u not in devices])
    for user_id, user_devices in devices.items():
        tokens = [t for t, p in user_devices.items() if not job.platforms or p in job.platforms]
        if tokens:
            chosen.per_user[user_id] = tokens
    chosen.without_tokens = len(devices) - len(chosen.per_user)
    if claims.part_counted(job.id, part):
        _as_counted(job, chosen, claims)
    if job.category is not None:
        _unmuted(job, job.category, chosen, claims)
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
    return chosen


def _as_counted(job: jobs.Job, chosen: Recipients, claims: Claims) -> None:
    """A later copy of a part whose users are counted keeps the decisions of the copy that counted them:
    a user none of whose tokens its ledger holds was left out then (under one rule, or without a device)
    and stays out, so an unmute or a freed cap slot since does not count the user twice."""
    tokens = [t for ts in chosen.per_user.values() for t in ts]
    entries = claims.ledger(job.id, tokens)
    for user_id in [u for u, ts in chosen.per_user.items() if all(entries[t].state is LedgerState.ABSENT for t in ts)]:
        del chosen.per_user[user_id]


def _unmuted(job: jobs.Job, category: str, chosen: Recipients, claims: Claims) -> None:
    """Leave out the users who muted ``category`` (counted) and those whose preferences are unreadable.
    A user an earlier copy of the part let through (a token of theirs is in the ledger: a retry waits)
    is not muted now: that copy's decision stands, so their tokens finish and the counts add up."""
    users = sorted(chosen.per_user)
    prefs = instance.preference_store().for_users(users)
    muted = [u for u in users if u in prefs and prefs[u].mutes(category)]
    if muted:
        entries = claims.ledger(job.id, [t for u in muted for t in chosen.per_user[u]])
        muted = [u for u in muted if all(entries[t].state is LedgerState.ABSENT for t in chosen.per_user[u])]
    unread = [u for u in users if u not in prefs]
    for user_id in (*muted, *unread):
        del chosen.per_user[user_id]
    chosen.muted = len(muted)
    chosen.unresolved += unread
