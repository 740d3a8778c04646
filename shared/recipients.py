"""Who of a part's users gets the notification, and on which devices: the per-user rules of ``deliver``.

Per user, in this order, each user counted under at most one of them:
  no device of the job's platforms   (``users.without_tokens``)
  the job's category muted           (``users.muted``; a job without a category is never muted,
                                      and ``urgent`` does not bypass a mute)
  ``once`` already used              (``users.skipped_once``)
  over the daily cap                 (``users.capped``; urgent jobs are neither capped nor counted)
Preferences are read here, when the part is delivered (the cache, rebuilt from PostgreSQL when missing
or stale), and only for a job with a category. A user whose tokens or preferences cannot be read now is
``unresolved``: left out of this copy, which the bus delivers again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from shared import instance, jobs
from shared.claims import now_ms


@dataclass
class Recipients:
    per_user: dict[str, list[str]]  # user -> tokens to send to
    without_tokens: int = 0
    muted: int = 0
    skipped_once: int = 0
    capped: int = 0
    unresolved: list[str] = field(default_factory=list)


def choose(job: jobs.Job, devices: Mapping[str, Mapping[str, str | None]]) -> Recipients:
    """Apply the per-user rules to the users whose devices were read (``devices``: user -> token ->
    platform); the job's other users are unresolved."""
    chosen = Recipients({}, unresolved=[u for u in job.user_ids if u not in devices])
    for user_id, user_devices in devices.items():
        tokens = [t for t, p in user_devices.items() if not job.platforms or p in job.platforms]
        if tokens:
            chosen.per_user[user_id] = tokens
    chosen.without_tokens = len(devices) - len(chosen.per_user)
    if job.category is not None:
        _unmuted(job.category, chosen)
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
    return chosen


def _unmuted(category: str, chosen: Recipients) -> None:
    """Leave out the users who muted ``category`` (counted) and those whose preferences are unreadable."""
    users = sorted(chosen.per_user)
    prefs = instance.preference_store().for_users(users)
    muted = [u for u in users if u in prefs and prefs[u].mutes(category)]
    unread = [u for u in users if u not in prefs]
    for user_id in (*muted, *unread):
        del chosen.per_user[user_id]
    chosen.muted = len(muted)
    chosen.unresolved += unread
