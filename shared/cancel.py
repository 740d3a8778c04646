"""The cancel use case (issue 22): stop a notification that is not done yet.

One flag in the notification's status (``Claims.cancel``, one script: nothing half-written), never a
walk over its tokens: from then on no token is leased, so nothing is sent beyond the requests in
flight (at most ``FCM_MAX_IN_FLIGHT`` per instance), which finish and count as FCM answers them; every
other token becomes final ``cancelled`` when a part next looks at it (the part running now, at once;
a part waiting for its retries or arriving later, when it comes). A repeated cancel answers the same.
``functions/main.py`` alone turns these results into HTTP answers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from shared import instance, jobs, logs
from shared.claims import CancelResult
from shared.errors import REDIS_OUTAGE, RedisUnavailable

log = logs.get("cancel")


@dataclass(frozen=True)
class Cancelled:
    """Cancelled, now or before: its status document (state ``cancelled``)."""

    status: dict[str, Any]


@dataclass(frozen=True)
class NotFound:
    """No notification has this id (or it is past LEDGER_TTL_SECONDS)."""

    reason: ClassVar[str] = "no such notification"


@dataclass(frozen=True)
class AlreadyDone:
    """Every token is final already: there is nothing left to cancel."""

    reason: ClassVar[str] = "the notification is done: nothing left to cancel"


@dataclass(frozen=True)
class InvalidId:
    """The id cannot be a notification id."""

    reason: ClassVar[str] = f"id must match {jobs.ID_PATTERN}"


Result = Cancelled | NotFound | AlreadyDone | InvalidId


def cancel(nid: str) -> Result:
    """Cancel the notification ``nid``; raises RedisUnavailable on any Redis error (nothing written)."""
    if not re.fullmatch(jobs.ID_PATTERN, nid):
        return InvalidId()
    claims = instance.claims()
    try:
        answer = claims.cancel(nid)
        status = claims.status(nid) if answer in (CancelResult.CANCELLED, CancelResult.ALREADY) else None
    except REDIS_OUTAGE as exc:
        outage = RedisUnavailable(exc)
        log.warning("Redis cannot serve a cancel: retry later", extra={"reason": str(outage)})
        raise outage from None
    if answer is CancelResult.DONE:
        return AlreadyDone()
    if status is None:  # unknown (or its status expired between the two steps)
        return NotFound()
    if answer is CancelResult.CANCELLED:
        log.info("notification cancelled", extra={"notification_id": nid})
        _give_back_deferred(nid)
    return Cancelled(status)


def _give_back_deferred(nid: str) -> None:
    """Users whose tokens waited for their quiet hours to end were never reached: their ``once`` claim and
    daily-cap slot go back (as ``deliver`` gives back those of users a cancel stopped). Best effort: a Redis
    error leaves them to expire (the claim after ONCE_TTL_SECONDS, the slot after 24 h)."""
    try:
        users, once = instance.deferrals().waiting_users(nid)
        if users and once:
            instance.claims().release_once(nid, once, users)
        instance.daily_cap().release(nid, users)
    except REDIS_OUTAGE as exc:
        log.warning("deferred users' claims not given back", extra={"reason": str(exc), "notification_id": nid})
