"""The schedule store: scheduled work in PostgreSQL (table ``scheduled_jobs``; the only code with its SQL).

A row is one job (and slot) not due yet, written by ``deliver`` (``record``: once; a second copy of
the same notification and slot changes nothing, finished or not). ``tick`` takes what is due:

- ``claim_due`` leases due rows for ``lease_seconds`` in one statement (``FOR UPDATE SKIP LOCKED``:
  two ticks at once take disjoint rows; a row whose lease ran out, its tick having died, is taken
  again — its job may then be published twice, which the ledger absorbs: same notification id);
- ``finish`` marks rows ``published`` or ``cancelled`` after the fact: they are never claimed again.

A quiet-hours deferral (``record_deferred``, ``shared/deferral.py``) is a row too, slot ``quiet:{minute}``:
the copies and parts that defer users to the same minute merge their users into it, until a tick takes it.

"Due" compares ``due_at`` with the clock the caller passes (tick's), without rounding; so do the leases
(ticks' clocks a few seconds apart only shorten or lengthen a two-minute lease a little). Every
PostgreSQL failure is ``ScheduleUnavailable``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pg8000.native

from shared.db import Database, DatabaseUnavailable
from shared.errors import Unavailable

PUBLISHED, CANCELLED = "published", "cancelled"


class ScheduleUnavailable(Unavailable):
    """PostgreSQL cannot be reached: nothing was recorded or claimed."""

    what = "the schedule (PostgreSQL)"


@dataclass(frozen=True)
class Due:
    """A claimed row: publish ``job`` (the job as it was recorded), then ``finish`` it."""

    notification_id: str
    slot: str
    due_at: datetime
    job: dict[str, Any]


_RECORD = """
INSERT INTO scheduled_jobs (notification_id, slot, due_at, job)
VALUES (:nid, :slot, :due_at, CAST(:job AS jsonb))
ON CONFLICT (notification_id, slot) DO NOTHING
RETURNING 1
"""

# A quiet-hours deferral (shared/deferral.py): one row per notification and due minute; the users of every
# part deferred to that minute are merged into its job (`job.user_ids`, a sorted set), as long as no tick
# has taken the row. Returns nothing when a tick has taken it already.
_RECORD_DEFERRED = """
INSERT INTO scheduled_jobs AS s (notification_id, slot, due_at, job)
VALUES (:nid, :slot, :due_at, CAST(:job AS jsonb))
ON CONFLICT (notification_id, slot) DO UPDATE SET job = jsonb_set(s.job, '{job,user_ids}', (
    SELECT jsonb_agg(u ORDER BY u) FROM (
        SELECT jsonb_array_elements_text(s.job #> '{job,user_ids}') AS u
        UNION SELECT jsonb_array_elements_text(EXCLUDED.job #> '{job,user_ids}')
    ) AS users
))
WHERE s.finished_at IS NULL AND s.claimed_until IS NULL
RETURNING 1
"""

_CLAIM = """
UPDATE scheduled_jobs SET claimed_until = CAST(:now AS timestamptz) + make_interval(secs => :lease)
WHERE (notification_id, slot) IN (
    SELECT notification_id, slot FROM scheduled_jobs
    WHERE finished_at IS NULL AND due_at <= :now
      AND (claimed_until IS NULL OR claimed_until <= :now)
    ORDER BY due_at
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
RETURNING notification_id, slot, due_at, job
"""

_FINISH = """
UPDATE scheduled_jobs SET finished_at = clock_timestamp(), outcome = :outcome, claimed_until = NULL
WHERE finished_at IS NULL
  AND (notification_id, slot) IN (
    SELECT k->>0, k->>1 FROM jsonb_array_elements(CAST(:keys AS jsonb)) AS k
  )
"""

_PRUNE = """
DELETE FROM scheduled_jobs WHERE finished_at < clock_timestamp() - make_interval(secs => :keep) RETURNING 1
"""

_PENDING = """
SELECT notification_id, slot, due_at, job FROM scheduled_jobs
WHERE finished_at IS NULL ORDER BY due_at LIMIT :limit
"""


class ScheduleStore:
    """Scheduled jobs in PostgreSQL."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def record(self, nid: str, due_at: datetime, job: dict[str, Any], slot: str = "") -> bool:
        """Keep ``job`` until ``due_at``; False when this notification and slot were recorded before."""
        return bool(self._sql(_RECORD, nid=nid, slot=slot, due_at=due_at, job=json.dumps(job, ensure_ascii=False)))

    def record_deferred(self, nid: str, slot: str, due_at: datetime, message: dict[str, Any]) -> bool:
        """Keep a deferred part (``message``, its users in ``message["job"]["user_ids"]``) until ``due_at``,
        merging its users into the row of this notification and slot; False when a tick has taken that row
        already (it publishes what it read: these users must go another way)."""
        job = json.dumps(message, ensure_ascii=False)
        return bool(self._sql(_RECORD_DEFERRED, nid=nid, slot=slot, due_at=due_at, job=job))

    def claim_due(self, now: datetime, *, limit: int, lease_seconds: float) -> list[Due]:
        """Lease up to ``limit`` rows due at ``now`` (the oldest first) that nobody holds."""
        rows = self._sql(_CLAIM, now=now, limit=limit, lease=lease_seconds)
        return sorted((Due(r[0], r[1], r[2], _json(r[3])) for r in rows), key=lambda d: d.due_at)

    def finish(self, keys: Iterable[tuple[str, str]], outcome: str) -> None:
        """Mark claimed rows ``published`` or ``cancelled``: never claimed again."""
        pairs = [list(k) for k in keys]
        if pairs:
            self._sql(_FINISH, keys=json.dumps(pairs), outcome=outcome)

    def pending(self, limit: int = 100) -> list[Due]:
        """Unfinished rows, the soonest first (the console and the CLI list them)."""
        return [Due(r[0], r[1], r[2], _json(r[3])) for r in self._sql(_PENDING, limit=limit)]

    def prune(self, keep_seconds: int) -> int:
        """Delete rows finished more than ``keep_seconds`` ago; how many."""
        return len(self._sql(_PRUNE, keep=keep_seconds))

    def _sql(self, sql: str, **params: object) -> list[list]:
        try:
            return self.db.run(sql, **params)
        except DatabaseUnavailable as exc:
            raise ScheduleUnavailable(str(exc)) from exc
        except pg8000.native.DatabaseError as exc:
            code = exc.args[0].get("C", "") if exc.args and isinstance(exc.args[0], dict) else ""
            if code[:2] in ("08", "57", "53"):  # connection, shutdown, resources
                raise ScheduleUnavailable(f"PostgreSQL unavailable ({code})") from exc
            raise


def _json(value: Any) -> dict[str, Any]:
    return json.loads(value) if isinstance(value, str | bytes) else value
