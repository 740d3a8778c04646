"""Quiet-hours deferral in ``deliver``: the users a part reaches inside their quiet hours become a
deferred part of the same notification, due when their quiet hours end.

A deferred part is the message ``{"kind": "deferred", "slot": "quiet:{minute}", "due_at": ms, "job":
{... "user_ids": [...]}}``: the notification's job (same id) for the users whose quiet hours end in
that minute. It is recorded in the schedule (PostgreSQL, ``shared/schedule.py``: one row per
notification and due minute; the users of every part deferred to that minute are merged into it)
*before* the part that deferred them is acknowledged, and ``tick`` publishes it when it is due. A row
that ``tick`` has taken already takes no more users: the part that would add them is redelivered
(by then the users' quiet hours have ended, and they get it directly). The Redis counts
(``shared/deferrals.py``) follow the row, once per user however many copies of the part run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shared import instance, jobs
from shared.claims import now_ms
from shared.deferrals import slot_name
from shared.inbound import Malformed, RetryLater

KIND = "deferred"


@dataclass(frozen=True)
class DeferredPart:
    """Which deferred part a message is: its slot (also its part id) and due time (ms)."""

    slot: str
    due_at: int


def message(job: jobs.Job, due_ms: int, users: Sequence[str]) -> dict[str, Any]:
    """The deferred part of ``job`` due at ``due_ms`` for ``users``."""
    return {"kind": KIND, "slot": slot_name(due_ms), "due_at": due_ms, "job": jobs.to_v1(jobs.with_users(job, users))}


def parse(payload: Mapping[str, Any]) -> DeferredPart:
    """The slot and due time of a deferred part's message; Malformed when they do not agree."""
    slot, due = payload.get("slot"), payload.get("due_at")
    if not isinstance(due, int) or isinstance(due, bool) or not isinstance(slot, str) or slot != slot_name(due):
        raise Malformed("deferred part without a valid slot/due_at")
    return DeferredPart(slot, due)


def record(job: jobs.Job, deferred: Mapping[int, Mapping[str, Sequence[str]]]) -> int:
    """Record each due minute's users durably, then count them in the status (once per user). Raises
    RetryLater when a due minute's row is being published already, ``Unavailable`` when PostgreSQL is down
    (nothing is acknowledged: the part is redelivered). Returns the tokens newly counted as deferred."""
    schedule = instance.schedule()
    for due, users in sorted(deferred.items()):
        due_at = datetime.fromtimestamp(due / 1000, UTC)
        if not schedule.record_deferred(job.id, slot_name(due), due_at, message(job, due, sorted(users))):
            raise RetryLater(f"the deferred part {slot_name(due)} is being published: its users are redelivered")
    return instance.deferrals().defer(job.id, deferred, now_ms(), job.once)
