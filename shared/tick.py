"""The tick use case: publish the scheduled work that is due (Cloud Scheduler calls ``tick`` every minute).

A row of the schedule (``shared.schedule``) is due when its time is at or before this tick's clock
(``claims.wall_clock``), without rounding. Each is published as it was recorded, with the attribute
``due: "1"`` (``deliver`` then sends it whatever its own clock says, and never records it again), and
marked published after the bus acknowledged it. A cancelled notification (``DELETE /<id>``: a flag in
its Redis status) is not published; its row is marked cancelled. Two ticks at once claim disjoint
rows; a tick that crashes after publishing leaves its rows leased, and a later tick publishes them
again once the lease has run out: the same notification id, so the ledger absorbs the repeat. Rows
finished more than LEDGER_TTL_SECONDS ago are deleted (until then a late copy of a job meets its row
and is not recorded again). Nothing here speaks HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from shared import bus, claims, instance, jobs, logs
from shared.config import settings
from shared.errors import REDIS_OUTAGE, redis_outage
from shared.schedule import CANCELLED, PUBLISHED, Due

BATCH = 200  # rows claimed per statement
MAX_BATCHES = 25  # per tick (5,000 jobs): the next tick takes the rest
LEASE_SECONDS = 120  # longer than a batch's publishing (10 s per publish at worst, usually milliseconds)

log = logs.get("tick")


@dataclass(frozen=True)
class Ticked:
    """What one tick did: jobs published, and due jobs dropped because they were cancelled."""

    published: int
    cancelled: int = 0


def tick(now: datetime | None = None) -> Ticked:
    """Publish what is due at ``now`` (default: the clock); raises ``Unavailable`` (PostgreSQL, the bus)
    after marking what it did publish."""
    at = now or datetime.fromtimestamp(claims.wall_clock(), UTC)
    schedule = instance.schedule()
    published = dropped = 0
    for _ in range(MAX_BATCHES):
        batch = schedule.claim_due(at, limit=BATCH, lease_seconds=LEASE_SECONDS)
        cancelled = _cancelled(batch)
        if cancelled:
            dropped_keys = [(d.notification_id, d.slot) for d in batch if d.notification_id in cancelled]
            schedule.finish(dropped_keys, CANCELLED)
            dropped += len(dropped_keys)
        done: list[tuple[str, str]] = []
        try:
            for due in batch:
                if due.notification_id not in cancelled:
                    bus.publish(due.job, {"notification_id": due.notification_id, **jobs.DUE_ATTRIBUTES})
                    done.append((due.notification_id, due.slot))
        finally:
            schedule.finish(done, PUBLISHED)  # (if this fails, the lease runs out: published again, absorbed)
            published += len(done)
        if len(batch) < BATCH:
            break
    forgotten = schedule.prune(keep_seconds=settings().ledger_ttl_seconds)  # as long as the ledger
    if published or dropped or forgotten:
        log.info(
            "due scheduled jobs published",
            extra={"published": published, "cancelled": dropped, "forgotten": forgotten},
        )
    return Ticked(published, dropped)


def _cancelled(batch: list[Due]) -> set[str]:
    """The notifications of ``batch`` cancelled (``DELETE /<id>``): not published. Redis unreadable: none
    (published anyway: deliver honours a cancel too, and sends nothing without Redis)."""
    if not batch:
        return set()
    try:
        return instance.claims().cancelled_among([d.notification_id for d in batch])
    except REDIS_OUTAGE as exc:
        log.warning("cancels unreadable: due jobs published anyway", extra={"reason": redis_outage(exc)})
        return set()
