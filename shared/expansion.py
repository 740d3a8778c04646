"""The expansion use case: an audience send's job becomes parts of at most AUDIENCE_PART_TOKENS devices.

``deliver`` calls :func:`expand` when it takes a job with an ``audience``. The expansion walks
``device_tokens`` a page at a time (``shared.audience_store``: at most AUDIENCE_PAGE_ROWS rows a page,
a ``statement_timeout`` on each) and publishes each page's matching devices as parts on the jobs topic,
as a fan-out's parts go, each carrying the notification's job (its id) and its devices (token, user,
platform, locale). After each page its checkpoint advances (``shared.checkpoint``), so:

- no process holds the audience: one page at a time;
- a copy that crashed or was stopped is continued by the next copy the bus delivers, from the last
  checkpoint (a page published but not checkpointed is published again with the same part numbers:
  the sharded ledger sends each device once however its parts repeat);
- the start is fixed when a copy first takes the job (PostgreSQL's clock) and stays across copies:
  devices first registered for their user after it are not in the audience;
- at most two expansions run at once project-wide (a third job waits on the bus); PostgreSQL down or
  slow (the statement timeout) is an outage like any (``shared.inbound``): the job is redelivered;
- one invocation expands for at most BUDGET_SECONDS, then publishes the job again to continue in a
  fresh invocation and acknowledges this copy; a scheduled job (``send_at``) is published again as
  ``tick`` publishes it, with ``due: "1"``, so a ``deliver`` whose clock is still before ``send_at``
  continues the expansion instead of recording the job as scheduled again.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from shared import bus, instance, jobs, logs
from shared.audience_store import FIRST_CURSOR, Device
from shared.checkpoint import NotTaken, Taken
from shared.config import settings
from shared.errors import REDIS_OUTAGE
from shared.inbound import RetryLater

log = logs.get("expansion")

BUDGET_SECONDS = 240  # one invocation's share of an expansion (well inside deliver's timeout)


def part_message(job: jobs.Job, part: int, devices: list[Device]) -> dict[str, Any]:
    """One audience part: its number, its devices ([token, user id, platform, locale]) and the job."""
    rows = [[d.token, d.user_id, d.platform, d.locale] for d in devices]
    return {"kind": "part", "part": part, "devices": rows, "job": jobs.to_v1(job)}


def expand(job: jobs.Job) -> str:
    """Publish the audience's parts from the checkpoint on; see the module docstring."""
    checkpoints = instance.checkpoints()
    instance.claims().create_status(job.id, targeted=0, audience=True)  # (a job published to the topic)
    taken = checkpoints.take(job.id)
    if isinstance(taken, NotTaken):
        if taken.why == "finished":
            instance.claims().sharded().part_done(job.id, None)  # (its last part may have finished first)
            return "expanded-before"
        what = "another copy of this job is expanding it" if taken.why == "busy" else "two expansions run already"
        raise RetryLater(f"audience expansion waits: {what}")
    try:
        return _pages(job, taken)
    except BaseException:
        with contextlib.suppress(*REDIS_OUTAGE):
            checkpoints.release(job.id, taken.owner)  # the next copy continues at once
        raise


def _pages(job: jobs.Job, taken: Taken) -> str:
    s = settings()
    store, checkpoints = instance.audience_store(), instance.checkpoints()
    audience = job.audience or {}
    per_part = s.audience_part_tokens
    stop_at = time.monotonic() + BUDGET_SECONDS
    start = taken.start or checkpoints.fix_start(job.id, store.now())
    cursor, next_part = taken.cursor, taken.next_part
    while True:
        if instance.claims().cancelled(job.id):  # no more parts: the expansion ends where it is
            checkpoints.advance(job.id, taken.owner, list(cursor or FIRST_CURSOR), 0, 0, last=True)
            log.info("cancelled audience: expansion stopped", extra={"notification_id": job.id, "parts": next_part})
            return "cancelled"
        page = store.page(audience, start, cursor, s.audience_page_rows)
        chunks = [page.devices[i : i + per_part] for i in range(0, len(page.devices), per_part)]
        for k, chunk in enumerate(chunks):
            bus.publish(part_message(job, next_part + k, chunk), {"notification_id": job.id, "kind": "part"})
        matched = len(page.devices)
        if not checkpoints.advance(job.id, taken.owner, page.cursor, len(chunks), matched, last=page.last):
            raise RetryLater("another copy of this job took its expansion over")
        cursor, next_part = page.cursor, next_part + len(chunks)
        if page.last:
            instance.claims().sharded().part_done(job.id, None)  # an empty audience is done now
            log.info("audience expanded", extra={"notification_id": job.id, "parts": next_part})
            return "expanded"
        if time.monotonic() >= stop_at:
            break
    checkpoints.release(job.id, taken.owner)
    due = jobs.DUE_ATTRIBUTES if job.send_at is not None else {}  # (whatever the next deliver's clock says)
    bus.publish(jobs.to_v1(job), {"notification_id": job.id, **due})  # a fresh invocation continues
    log.info("audience expansion continues in a new invocation", extra={"notification_id": job.id, "parts": next_part})
    return "expansion-continues"
